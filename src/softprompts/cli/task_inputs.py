"""The task a command line describes: a template (``--template`` / ``--target``) or chat rows (``messages``), with
the placement of the virtual tokens, rendered into examples. Shared by ``train``, ``compare`` and ``eval``; a task an
adapter recorded (``--init-from``, ``eval --adapter``) gives the defaults for what the flags do not say."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from softprompts.data.chat import DEFAULT_PLACEMENT, PLACEMENTS
from softprompts.data.templates import VIRTUAL
from softprompts.errors import SoftpromptsError
from softprompts.task_spec import ChatSpec, TaskSpec


def add_chat_flags(p) -> None:
    p.add_argument("--placement", default=None, choices=PLACEMENTS,
                   help=f"chat data: where the virtual tokens go (default {DEFAULT_PLACEMENT}); a template places "
                        f"them with the marker {VIRTUAL} instead")
    p.add_argument("--system", default=None, help="chat data: a system message for rows that have none")


def task_labels(text: str | None, task: str, previous: TaskSpec | None = None) -> list[str] | None:
    """The label set of a task: ``--labels`` (comma-separated), else the ``previous`` task's when it is the same
    kind of task; ``None``: the labels found in the data. ``--labels`` with a generate task is an error."""
    labels = [x.strip() for x in text.split(",") if x.strip()] if text else None
    if labels and task != "classify":
        raise SoftpromptsError(f"--labels is for --task classify: a {task} task has no label set")
    return labels or (previous.labels if previous is not None and previous.task == task else None)


def load_task(task: str, train_path, dev_paths: list, tokenizer: Callable[[], object], *, template: str | None = None,
              target: str | None = None, labels: list[str] | None = None, placement: str | None = None,
              system: str | None = None, max_prompt_tokens: int | None = None, max_target_tokens: int | None = None,
              previous: TaskSpec | None = None, optional_devs: bool = False, hint: str = "") -> tuple:
    """``(spec, examples of train_path, [dev examples per path])``; ``eval`` passes its one data file as
    ``train_path`` and no dev paths. Rows holding ``messages`` (and no template given) are chat rows rendered with
    ``tokenizer()``'s chat template (called only then); ``previous``: the task an adapter records, the defaults for
    what is not given (limits included); ``optional_devs``: a dev path may be ``None`` (no examples); ``hint``: added
    to the error for a missing template."""
    from softprompts.data.datasets import build_examples
    from softprompts.data.sources import load_task_data, read_rows

    records = read_rows(train_path)
    given = {"max_prompt_tokens": max_prompt_tokens, "max_target_tokens": max_target_tokens}
    limits = {k: getattr(previous, k) if v is None else v for k, v in given.items()  # neither: TaskSpec's defaults
              if v is not None or previous is not None}
    spec, fmt = _task_format(task, records, tokenizer, template, target, placement, system, limits, previous, hint)
    examples, labels = build_examples(records, fmt, task, labels, source=str(train_path))
    devs = [load_task_data(path, fmt, task, labels)[0] if path or not optional_devs else [] for path in dev_paths]
    return replace(spec, labels=labels), examples, devs


def _task_format(task: str, records, tokenizer: Callable[[], object], template: str | None, target: str | None,
                 placement: str | None, system: str | None, limits: dict, previous: TaskSpec | None,
                 hint: str) -> tuple:
    """``(spec without labels, the format that renders the rows)``: chat when the rows hold ``messages`` or the
    previous task was chat (and no template is given), else the template (each part the flag's or the previous)."""
    from softprompts.data.datasets import is_chat
    from softprompts.data.templates import Template, from_shell

    before = previous.chat if previous is not None else None
    if template is None and target is None and (is_chat(records) or before is not None):
        before = before or ChatSpec()
        spec = TaskSpec.for_chat(task, None, placement or before.placement,
                                 system if system is not None else before.system, **limits)
        return spec, spec.prompt_format(tokenizer())
    if placement is not None or system is not None:
        raise SoftpromptsError(f"--placement and --system are for chat rows (messages); in a template, put "
                               f"{VIRTUAL} where the virtual tokens go")
    recorded = previous if before is None and previous is not None else TaskSpec()  # a chat task's are no template's
    prompt = from_shell(template) if template else recorded.prompt
    tgt = from_shell(target) if target else recorded.target
    if not prompt or not tgt:
        raise SoftpromptsError("--template and --target are required (e.g. --template "
                               "'Review: {text}\\nSentiment:' --target ' {label}'), or rows holding 'messages' "
                               f"(chat data){hint}")
    fmt = Template(prompt, tgt)
    return TaskSpec(task, fmt.prompt, fmt.target, None, **limits), fmt


__all__ = ["add_chat_flags", "load_task", "task_labels"]
