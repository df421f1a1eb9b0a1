"""The ``softprompts`` command line. Each subcommand lives in its own module with ``register(subparsers)``.

Errors a user can fix (``SoftpromptsError`` and friends) print one line and exit with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module name -> imported lazily so `softprompts --help` stays fast
SUBCOMMANDS = [
    "train",
    "tune",
    "evaluate",
    "generate",
    "inspect",
    "demo",
    "compare",
    "data",
    "serve",
    "export",
    "import_",
    "table",
    "compose",
    "explain",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softprompts",
        description="Adapt a frozen language model with learned continuous prompts, and measure which method to pick.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:  # a missing module is an error: a typo must not silently remove a command
        importlib.import_module(f"softprompts.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from softprompts.errors import SoftpromptsError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra_args", False):  # only `serve` passes options on (to vLLM)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (SoftpromptsError, FileExistsError) as exc:
        print(f"softprompts {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"softprompts {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
