"""The task a command line describes: a template (``--template`` / ``--target``) or chat rows (``messages``), with
the placement of the virtual tokens, rendered into examples. Shared by ``train`` and ``compare``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from softprompts.data.chat import DEFAULT_PLACEMENT, PLACEMENTS
from softprompts.data.templates import VIRTUAL
from softprompts.errors import SoftpromptsError


def add_chat_flags(p) -> None:
    p.add_argument("--placement", default=None, choices=PLACEMENTS,
                   help=f"chat data: where the virtual tokens go (default {DEFAULT_PLACEMENT}); a template places "
                        f"them with the marker {VIRTUAL} instead")
    p.add_argument("--system", default=None, help="chat data: a system message for rows that have none")


def load_task(task: str, train_path, dev_paths: list, tokenizer: Callable[[], object], *, template: str | None = None,
              target: str | None = None, labels: list[str] | None = None, placement: str | None = None,
              system: str | None = None, max_prompt_tokens: int = 256, max_target_tokens: int = 64,
              previous: dict | None = None, optional_devs: bool = False) -> tuple:
    """``(spec, train examples, [dev examples per path])``. Rows holding ``messages`` (and no template given) are
    chat rows rendered with ``tokenizer()``'s chat template (called only then); ``previous``: the task an
    ``--init-from`` adapter records, the defaults for what is not given; ``optional_devs``: a dev path may be
    ``None`` (no examples)."""
    from softprompts.data.datasets import build_examples, is_chat
    from softprompts.data.sources import load_task_data, read_rows
    from softprompts.data.templates import Template
    from softprompts.tasks import TaskSpec  # imports torch: not at --help time

    previous = previous or {}
    records = read_rows(train_path)
    chat = template is None and target is None and (is_chat(records) or previous.get("chat") is not None)
    limits = {"max_prompt_tokens": max_prompt_tokens, "max_target_tokens": max_target_tokens}
    if chat:
        before = previous.get("chat") or {}
        spec = TaskSpec.for_chat(task, None, placement or before.get("placement") or DEFAULT_PLACEMENT,
                                 system if system is not None else before.get("system"), **limits)
        fmt = spec.prompt_format(tokenizer())
    else:
        if placement is not None or system is not None:
            raise SoftpromptsError(f"--placement and --system are for chat rows (messages); in a template, put "
                                   f"{VIRTUAL} where the virtual tokens go")
        prompt, tgt = template or previous.get("prompt"), target or previous.get("target")
        if not prompt or not tgt:
            raise SoftpromptsError("--template and --target are required (e.g. --template "
                                   "'Review: {text}\\nSentiment:' --target ' {label}'), or rows holding 'messages' "
                                   "(chat data)")
        fmt = Template.from_cli(prompt, tgt) if template or target else Template(prompt, tgt)
        spec = TaskSpec(task, fmt.prompt, fmt.target, None, **limits)
    examples, labels = build_examples(records, fmt, task, labels, source=str(train_path))
    devs = [load_task_data(path, fmt, task, labels)[0] if path or not optional_devs else [] for path in dev_paths]
    return replace(spec, labels=labels), examples, devs


__all__ = ["add_chat_flags", "load_task"]
