"""Evaluation from files, below the command line: ``softprompts eval`` is its flags plus one call
(``evaluate_files``, or ``evaluate_table`` for several tasks of a prompt table), and ``sp.evaluate_files`` is the
same call; ``softprompts explain`` and ``sp.explain_files`` likewise (``explain_files``). Bare-model and adapter
metrics come from the same code (``softprompts.evaluate.evaluate``), so they compare.

The task of an ``EvalFiles`` request is the one its adapter recorded (classify or generate, template and target,
labels, chat placement and system message) with every part the flags give in its place; without an adapter the bare
model is scored on the task the flags describe (a template and target, or rows holding ``messages``). The recorded
labels stay unless a template or target gives another task: then the flags' labels, or those found in the data.

Explaining an adapter (``explain_files``: ``softprompts explain``, ``sp.explain_files``): where it acts in its base,
on rows rendered with the task it recorded (as ``evaluate_files`` renders them without task flags); an adapter
without a task is refused before any row is read, a base that cannot be probed layer by layer (``layer_probe``)
before any is scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from softprompts.data.sources import load_task_data
from softprompts.errors import SoftpromptsError
from softprompts.evaluate import evaluate, evaluate_tasks
from softprompts.explain import ExplainConfig, Explanation, explain, write_report
from softprompts.model.load import load_base
from softprompts.table import PromptTable, adapter_base_name
from softprompts.workflow.inputs import Source, TaskFlags, load_task, task_labels

NO_ADAPTER_HINT = "; without --adapter the bare model is scored, on the task these flags describe"


@dataclass(frozen=True)
class EvalFiles:
    """The metrics of ``source`` (an adapter, or the bare model) on the rows of ``data``, on the task ``flags``
    describe over the adapter's own (module docstring); ``batch_size`` rows per forward, ``max_new_tokens`` the
    decoding limit of generation tasks (``None``: the task's target limit)."""

    data: str
    source: Source = Source()
    flags: TaskFlags = TaskFlags()
    batch_size: int = 16
    max_new_tokens: int | None = None


def evaluate_files(request: EvalFiles) -> dict:
    """``{metric: value, ..., "n": rows}`` of ``request`` (``softprompts eval``). The adapter and its base load
    first; the bare model after a template's rows are checked (chat rows need its tokenizer)."""
    adapter, base = request.source.open()
    previous = adapter.task if adapter is not None else None
    hint = NO_ADAPTER_HINT if adapter is None else f"; {request.source.adapter} records no task"
    flags = request.flags
    kind = flags.kind(previous)
    same_task = flags.template is None and flags.target is None
    flags = replace(flags, task=kind, labels=task_labels(flags.labels, kind, previous if same_task else None))
    spec, examples, _ = load_task(flags, request.data, [], lambda: base().tokenizer, previous=previous, hint=hint)
    return evaluate(base(), adapter, examples, spec, batch_size=request.batch_size,
                    max_new_tokens=request.max_new_tokens)


def evaluate_table(source: Source, data: list[tuple[str, str]], batch_size: int = 16,
                   max_new_tokens: int | None = None) -> dict[str, dict]:
    """``{task name: metrics}`` of several tasks of the prompt table ``source.table``, each ``(name, path)`` of
    ``data`` on the task it recorded. Their rows share batches (one forward per batch, each row with its own task's
    prompt) and each task's metrics are those it gets alone (``evaluate.evaluate_tasks``)."""
    table = PromptTable.load(source.table)
    for name, _ in data:
        table.info(name)  # a clear error for an unknown task, before loading a model
    base = load_base(source.model or table.base_record.name, dtype=source.dtype, device="auto",
                     quantize=source.quantize)
    table.attach(base)
    tasks = []
    for name, path in data:
        spec = table.info(name).task
        if spec is None or spec.task is None:
            raise SoftpromptsError(f"task {name!r} of {source.table} has no task metadata (template, labels): "
                                   f"evaluate it with --adapter {source.table}#{name} and the task flags")
        examples, _ = load_task_data(path, spec.prompt_format(base.tokenizer), spec.task, spec.labels)
        tasks.append((table.artifact(name), examples, spec))
    results = evaluate_tasks(base, tasks, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return {name: result for (name, _), result in zip(data, results, strict=True)}


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


__all__ = ["EvalFiles", "ExplainFiles", "evaluate_files", "evaluate_table", "explain_files"]
