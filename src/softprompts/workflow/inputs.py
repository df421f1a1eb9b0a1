"""What a command reads, below the command line: a task from files and flags (``load_task``), and what it runs on,
an adapter reference with its overrides or the bare model (``Source``, ``open_adapter``, ``lazy_base``).

A task from files and flags (``train``, ``compare``, ``tune``, ``eval``, ``explain``). ``TaskFlags`` hold what was
said (a template and target, or chat rows' placement and system message, labels, limits); what was not said comes
from the task an adapter recorded (``previous``), else the defaults; rows holding ``messages`` are chat rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from softprompts.adapter import Adapter
from softprompts.data.datasets import build_examples, is_chat
from softprompts.data.sources import load_task_data, read_rows
from softprompts.data.templates import VIRTUAL, Template, from_shell
from softprompts.errors import SoftpromptsError
from softprompts.model.frozen import FrozenBase
from softprompts.model.load import DEFAULT_MODEL, load_base
from softprompts.table import adapter_base_name, resolve_adapter
from softprompts.task_spec import ChatSpec, TaskSpec


@dataclass(frozen=True)
class TaskFlags:
    """What a command line (or a caller) says of a task; ``None``: not said, so the previous task's (an adapter's,
    ``--init-from``, ``eval --adapter``) or the defaults. ``task``: classify or generate (``kind``), ``template`` /
    ``target`` as typed (a backslash-n is a newline), ``labels`` the label set (``None``: the labels found in the
    data), ``placement`` / ``system`` for chat rows, the token limits of prompts and targets."""

    task: str | None = None
    template: str | None = None
    target: str | None = None
    labels: list[str] | None = None
    placement: str | None = None
    system: str | None = None
    max_prompt_tokens: int | None = None
    max_target_tokens: int | None = None

    def kind(self, previous: TaskSpec | None = None) -> str:
        """The task's kind: the one said, else the ``previous`` task's, else classify."""
        return self.task or (previous.task if previous is not None else None) or "classify"


def task_labels(labels: list[str] | None, task: str, previous: TaskSpec | None = None) -> list[str] | None:
    """The label set of a ``task``: ``labels`` when given, else the ``previous`` task's when it is the same kind of
    task; ``None``: the labels found in the data. Labels for a generate task are an error (it has no label set)."""
    if labels and task != "classify":
        raise SoftpromptsError(f"--labels is for --task classify: a {task} task has no label set")
    return labels or (previous.labels if previous is not None and previous.task == task else None)


def load_task(flags: TaskFlags, train_path, dev_paths: list, tokenizer: Callable[[], object], *,
              previous: TaskSpec | None = None, optional_devs: bool = False, hint: str = "") -> tuple:
    """``(spec, examples of train_path, [dev examples per path])`` of the task ``flags`` describe: a template, or
    rows holding ``messages`` (and no template given): chat rows rendered with ``tokenizer()``'s chat template (called
    only then). ``eval`` passes its one data file as ``train_path`` and no dev paths; ``previous``: the task an
    adapter records, the defaults for what is not given (limits included); ``optional_devs``: a dev path may be
    ``None`` (no examples); ``hint``: added to the error for a missing template."""
    flags = replace(flags, task=flags.kind(previous))
    records = read_rows(train_path)
    given = {"max_prompt_tokens": flags.max_prompt_tokens, "max_target_tokens": flags.max_target_tokens}
    limits = {k: getattr(previous, k) if v is None else v for k, v in given.items()  # neither: TaskSpec's defaults
              if v is not None or previous is not None}
    spec, fmt = _task_format(flags, records, tokenizer, limits, previous, hint)
    examples, labels = build_examples(records, fmt, flags.task, flags.labels, source=str(train_path))
    devs = [load_task_data(path, fmt, flags.task, labels)[0] if path or not optional_devs else []
            for path in dev_paths]
    return replace(spec, labels=labels), examples, devs


def _task_format(flags: TaskFlags, records, tokenizer: Callable[[], object], limits: dict,
                 previous: TaskSpec | None, hint: str) -> tuple:
    """``(spec without labels, the format that renders the rows)``: chat when the rows hold ``messages`` or the
    previous task was chat (and no template is given), else the template (each part the flag's or the previous)."""
    before = previous.chat if previous is not None else None
    if flags.template is None and flags.target is None and (is_chat(records) or before is not None):
        before = before or ChatSpec()
        spec = TaskSpec.for_chat(flags.task, None, flags.placement or before.placement,
                                 flags.system if flags.system is not None else before.system, **limits)
        return spec, spec.prompt_format(tokenizer())
    if flags.placement is not None or flags.system is not None:
        raise SoftpromptsError(f"--placement and --system are for chat rows (messages); in a template, put "
                               f"{VIRTUAL} where the virtual tokens go")
    recorded = previous if before is None and previous is not None else TaskSpec()  # a chat task's are no template's
    prompt = from_shell(flags.template) if flags.template else recorded.prompt
    tgt = from_shell(flags.target) if flags.target else recorded.target
    if not prompt or not tgt:
        raise SoftpromptsError("--template and --target are required (e.g. --template "
                               "'Review: {text}\\nSentiment:' --target ' {label}'), or rows holding 'messages' "
                               f"(chat data){hint}")
    fmt = Template(prompt, tgt)
    return TaskSpec(flags.task, fmt.prompt, fmt.target, None, **limits), fmt


@dataclass(frozen=True)
class Source:
    """What a command runs on: an adapter reference (``table.resolve_adapter``: a directory, ``TABLE_DIR#NAME``,
    or ``table:NAME`` with ``table``) or none (the bare model), on ``model`` (default: the adapter's own base, the
    embedded model without an adapter), loaded ``quantize``d when given, in ``dtype`` (``model/load.resolve_dtype``:
    float32 by default, ``auto`` for bfloat16 where the hardware is fast at it)."""

    adapter: str | None = None
    model: str | None = None
    table: str | None = None
    quantize: str | None = None
    dtype: str | None = None

    def open(self) -> tuple[Adapter | None, Callable[[], FrozenBase]]:
        """``(adapter or None, base loader)``: an adapter and its base load now; the bare model when first
        needed (a template's rows are then checked before it loads)."""
        if self.adapter is None:
            return None, lazy_base(self.model, self.quantize, dtype=self.dtype)
        adapter, base = open_adapter(self.adapter, self.model, self.table, self.quantize, self.dtype)
        return adapter, lambda: base


def open_adapter(ref: str, model: str | None = None, table: str | None = None,
                 quantize: str | None = None, dtype: str | None = None) -> tuple[Adapter, FrozenBase]:
    """``(adapter, base)`` of an adapter reference; the base is the adapter's own unless ``model`` is given."""
    base = load_base(model or adapter_base_name(ref, table), dtype=dtype, device="auto", quantize=quantize)
    return resolve_adapter(ref, base, table), base


def lazy_base(model: str | None, quantize: str | None = None, device: str | None = "auto",
              device_map: str | None = None, dtype: str | None = None) -> Callable[[], FrozenBase]:
    """The base model (``model``, default the embedded one) in ``dtype`` on ``device`` (or spread by
    ``device_map``), loaded on the first call and kept."""
    loaded: list[FrozenBase] = []

    def base() -> FrozenBase:
        if not loaded:
            loaded.append(load_base(model or DEFAULT_MODEL, dtype=dtype, device=device, device_map=device_map,
                                    quantize=quantize))
        return loaded[0]

    return base


__all__ = ["Source", "TaskFlags", "lazy_base", "load_task", "open_adapter", "task_labels"]
