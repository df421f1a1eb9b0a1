"""Explaining an adapter from files, below the command line: ``softprompts explain`` is its flags plus one call
(``explain_files``), and ``sp.explain_files`` is the same call. The rows are rendered with the task the adapter
recorded (as ``evaluate_files`` renders them without task flags); an adapter without a task is refused before any
row is read, and a base that cannot be probed layer by layer (``layer_probe``) before any is scored."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from softprompts.errors import SoftpromptsError
from softprompts.explain import ExplainConfig, Explanation, explain, write_report
from softprompts.table import adapter_base_name
from softprompts.workflow.inputs import Source, TaskFlags, load_task, task_labels


@dataclass(frozen=True)
class ExplainFiles:
    """Where ``source``'s adapter acts in its base, on the rows of ``data`` (``config``: how many rows, nearest
    tokens, batch size, decoding limit); ``explain.json``, ``explain.md`` and the plots are written to ``out``."""

    source: Source
    data: str
    out: str | Path
    config: ExplainConfig = field(default_factory=ExplainConfig)


def explain_files(request: ExplainFiles) -> tuple[Explanation, list[Path]]:
    """``(the explanation, the files written)`` of ``request`` (module docstring)."""
    source = request.source
    if source.adapter is None:
        raise SoftpromptsError("explain needs an adapter: --adapter DIR (or TABLE_DIR#NAME)")
    adapter_base_name(source.adapter, source.table)  # a clear error for a missing adapter before a model loads
    adapter, base = source.open()
    base().require("layer_probe")
    recorded = adapter.task
    if recorded is None or recorded.task is None:
        raise SoftpromptsError(f"{source.adapter} records no task (template, labels): explain runs on the task an "
                               "adapter was trained on; train it with softprompts train, which records it")
    flags = TaskFlags(recorded.task, labels=task_labels(None, recorded.task, recorded))
    spec, examples, _ = load_task(flags, request.data, [], lambda: base().tokenizer, previous=recorded)
    explanation = explain(base(), adapter, examples, spec, request.config, adapter_dir=source.adapter)
    return explanation, write_report(explanation, request.out, title=str(source.adapter))


__all__ = ["ExplainFiles", "explain_files"]
