"""``softprompts eval``: metrics of an adapter, or of the bare model, on a task file.

With ``--adapter`` the task (classify or generate, template and target, labels, chat placement and system message)
is the one the adapter recorded, and every task flag given replaces that part of it: ``--data other.jsonl
--template T --target T2`` scores the adapter on another task. Without ``--adapter`` the bare model is scored
(``--model``, default smollm2-135m) on the task the flags describe: ``--template`` and ``--target`` (``--task``
default classify, ``--labels`` default the labels found in the data), or rows holding ``messages`` (chat data,
rendered with the model's chat template as ``train`` renders them, ``--placement`` / ``--system`` as in ``train``).
An adapter's recorded labels stay unless ``--template`` / ``--target`` give another task: then ``--labels``, or the
labels found in the data. Bare-model and adapter metrics come from the
same code (``softprompts.evaluate.evaluate``), so they compare.

``--adapter`` is an adapter directory, ``TABLE_DIR#NAME`` (a task of a prompt table) or ``table:NAME`` with
``--table``. ``--table TABLE --data NAME=FILE --data NAME2=FILE2`` evaluates several tasks of a prompt table at once,
each with the task it recorded: their rows share batches (one forward per batch, each row with its own task's prompt)
and each task's metrics are those it gets alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from softprompts.cli.arguments import add_quantize_flag
from softprompts.cli.task_inputs import add_chat_flags
from softprompts.errors import SoftpromptsError

if TYPE_CHECKING:
    from softprompts.task_spec import TaskSpec

TASK_FLAGS = ("task", "template", "target", "labels", "placement", "system")
NO_ADAPTER_HINT = "; without --adapter the bare model is scored, on the task these flags describe"


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an adapter or the bare model (or several prompt-table tasks) on data",
                       description=__doc__)
    p.add_argument("--adapter", default=None, help="adapter directory, TABLE_DIR#NAME, or table:NAME with --table "
                   "(default: none, the bare model is scored)")
    p.add_argument("--table", default=None, help="prompt table directory: with --data NAME=FILE (repeatable) "
                   "evaluates those tasks together")
    p.add_argument("--data", required=True, action="append", help="evaluation data: .jsonl, .json, .csv or .tsv; "
                   "with --table and no --adapter, NAME=FILE (repeat for several tasks)")
    p.add_argument("--model", default=None, help="base model (default: the adapter's own base model, without "
                   "--adapter smollm2-135m)")
    p.add_argument("--task", default=None, choices=("classify", "generate"),
                   help="default: the adapter's task, without --adapter classify")
    p.add_argument("--template", default=None, help=r'prompt template over row fields, e.g. "Review: {text}\n'
                   r'Sentiment:" (default: the adapter'"'s)")
    p.add_argument("--target", default=None, help='target template, e.g. " {label}" (default: the adapter\'s)')
    add_chat_flags(p)
    p.add_argument("--labels", default=None, help="classify: comma-separated label set (default: the adapter's; "
                   "with --template/--target or without --adapter, the labels found in --data)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation tasks: decoding limit")
    p.add_argument("--json", action="store_true", help="print one JSON object with the metrics and n (per task name "
                   "with --table)")
    add_quantize_flag(p)
    p.set_defaults(func=run)


def _format(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def run(args) -> int:
    if args.adapter is None and args.table is not None:
        return run_table(args)
    from softprompts.evaluate import evaluate

    if len(args.data) != 1:
        raise SoftpromptsError("--data is given once (use --table and --data NAME=FILE for several tasks)")
    adapter, base, previous, hint = _subject(args)
    spec, examples = task_of(args, base, previous, hint)
    metrics = evaluate(base(), adapter, examples, spec, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens)
    print(json.dumps(metrics) if args.json else _format(metrics))
    return 0


def _subject(args) -> tuple:
    """``(adapter or None, base loader, the task the adapter recorded, a hint for a missing template)``: the adapter
    and its base load now; the bare model (no ``--adapter``) when first needed."""
    from softprompts.workflow import lazy_base, open_adapter

    if args.adapter is None:
        return None, lazy_base(args.model, args.quantize), None, NO_ADAPTER_HINT
    adapter, base = open_adapter(args.adapter, args.model, args.table, args.quantize)
    return adapter, lambda: base, adapter.task, f"; {args.adapter} records no task"


def task_of(args, base: Callable[[], object], previous: TaskSpec | None, hint: str = "") -> tuple:
    """``(spec, examples)`` of the one ``--data`` file: the ``previous`` task (an adapter's record) with each task
    flag given in its place (``task_inputs.load_task``, the rule ``train`` follows). The recorded labels stay unless
    ``--template`` / ``--target`` give another task (then: the labels found in the data, or ``--labels``). A
    template's rows are checked before ``base()`` loads the model; chat rows need its tokenizer."""
    from softprompts.cli.task_inputs import task_labels
    from softprompts.workflow import TaskFlags, load_task

    task = args.task or (previous.task if previous is not None else None) or "classify"
    same_task = args.template is None and args.target is None
    flags = TaskFlags(task, args.template, args.target, task_labels(args.labels, task, previous if same_task else None),
                      args.placement, args.system)
    spec, examples, _ = load_task(flags, args.data[0], [], lambda: base().tokenizer, previous=previous, hint=hint)
    return spec, examples


def run_table(args) -> int:
    """``--table TABLE --data NAME=FILE ...``: several tasks of one table in shared batches."""
    from softprompts.data.sources import load_task_data
    from softprompts.evaluate import evaluate_tasks
    from softprompts.model.load import load_base
    from softprompts.table import PromptTable

    given = [f"--{name}" for name in TASK_FLAGS if getattr(args, name) is not None]
    if given:
        raise SoftpromptsError(f"{', '.join(given)}: with --table and --data NAME=FILE each task is evaluated on the "
                               "task it recorded; to score one of them on another task, use --adapter TABLE#NAME")
    pairs = _table_pairs(args.data)
    table = PromptTable.load(args.table)
    for name, _ in pairs:
        table.info(name)  # a clear error for an unknown task, before loading a model
    base = load_base(args.model or table.base_record.name, device="auto", quantize=args.quantize)
    table.attach(base)
    tasks = []
    for name, path in pairs:
        spec = table.info(name).task
        if spec is None or spec.task is None:
            raise SoftpromptsError(f"task {name!r} of {args.table} has no task metadata (template, labels): "
                                   f"evaluate it with --adapter {args.table}#{name} and the task flags")
        examples, _ = load_task_data(path, spec.prompt_format(base.tokenizer), spec.task, spec.labels)
        tasks.append((table.artifact(name), examples, spec))
    results = evaluate_tasks(base, tasks, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    metrics = {name: result for (name, _), result in zip(pairs, results, strict=True)}
    if args.json:
        print(json.dumps(metrics))
    else:
        for name, result in metrics.items():
            print(f"{name}: {_format(result)}")
    return 0


def _table_pairs(data: list[str]) -> list[tuple[str, str]]:
    """``[(task name, path)]`` of ``--data NAME=FILE`` flags."""
    pairs: list[tuple[str, str]] = []
    for item in data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SoftpromptsError(f"--data {item!r}: with --table, give NAME=FILE (a task of the table and its data)")
        if name in (n for n, _ in pairs):
            raise SoftpromptsError(f"--data names task {name!r} twice")
        pairs.append((name, path))
    return pairs
