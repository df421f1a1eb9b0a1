"""``softprompts compose A B [...] --out DIR``: KV-prefix adapters (cartridges) concatenated into one adapter."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compose", help="concatenate KV-prefix adapters (cartridges) into one, no retraining",
                       description=__doc__ + " The parts' prefixes are placed side by side in the order given "
                       "(softprompts/compose.py); measure the result with softprompts eval.")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter directories (or TABLE#NAME), two or more")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softprompts.adapter_io import save_adapter
    from softprompts.compose import compose
    from softprompts.files import check_output
    from softprompts.table import resolve_adapter

    check_output(args.out, overwrite=args.overwrite)
    adapter = compose([resolve_adapter(ref) for ref in args.adapters], names=list(args.adapters))
    out = save_adapter(adapter, args.out, overwrite=args.overwrite)
    print(f"wrote {adapter.method} adapter of {adapter.num_virtual_tokens} virtual tokens ({len(args.adapters)} "
          f"parts) to {out}")
    return 0
