"""``softprompts eval``: metrics of a saved adapter on a task file (template and labels come from the adapter).

``--adapter`` is an adapter directory, ``TABLE_DIR#NAME`` (a task of a prompt table) or ``table:NAME`` with
``--table``. ``--table TABLE --data NAME=FILE --data NAME2=FILE2`` evaluates several tasks of a prompt table at once:
their rows share batches (one forward per batch, each row with its own task's prompt) and each task's metrics are
those it gets alone.
"""

from __future__ import annotations

import json

from softprompts.errors import SoftpromptsError


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an adapter (or several prompt-table tasks) on data files",
                       description=__doc__)
    p.add_argument("--adapter", default=None, help="adapter directory, TABLE_DIR#NAME, or table:NAME with --table")
    p.add_argument("--table", default=None, help="prompt table directory: with --data NAME=FILE (repeatable) "
                   "evaluates those tasks together")
    p.add_argument("--data", required=True, action="append", help="evaluation data: .jsonl, .csv or .tsv; with "
                   "--table and no --adapter, NAME=FILE (repeat for several tasks)")
    p.add_argument("--model", default=None, help="base model (default: the adapter's own base model)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation tasks: decoding limit")
    p.add_argument("--json", action="store_true", help="print one JSON object with the metrics and n (per task name "
                   "with --table)")
    p.set_defaults(func=run)


def load_adapter_and_base(ref: str, model: str | None = None, table: str | None = None):
    """(adapter, base, spec) for an adapter reference (see ``table.resolve_adapter``); the base is the adapter's
    own unless ``model`` is given."""
    from softprompts.model.load import load_base
    from softprompts.table import adapter_base_name, resolve_adapter
    from softprompts.tasks import TaskSpec

    base = load_base(model or adapter_base_name(ref, table), device="auto")
    adapter = resolve_adapter(ref, base, table)
    spec = TaskSpec.from_json(adapter.task) if adapter.task else None
    return adapter, base, spec


def _format(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def run(args) -> int:
    if args.adapter is None:
        if args.table is None:
            raise SoftpromptsError("pass --adapter (an adapter directory or TABLE_DIR#NAME) or --table with "
                                   "--data NAME=FILE")
        return run_table(args)
    from softprompts.data.sources import load_task_data
    from softprompts.evaluate import evaluate

    if len(args.data) != 1:
        raise SoftpromptsError("--data is given once with --adapter (use --table and --data NAME=FILE for several "
                               "tasks)")
    adapter, base, spec = load_adapter_and_base(args.adapter, args.model, args.table)
    if spec is None:
        raise SoftpromptsError(f"{args.adapter} has no task metadata (template, labels): it cannot be evaluated")
    examples, _ = load_task_data(args.data[0], spec.prompt_format(base.tokenizer), spec.task, spec.labels)
    metrics = evaluate(base, adapter, examples, spec, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    print(json.dumps(metrics) if args.json else _format(metrics))
    return 0


def run_table(args) -> int:
    """``--table TABLE --data NAME=FILE ...``: several tasks of one table in shared batches."""
    from softprompts.data.sources import load_task_data
    from softprompts.evaluate import evaluate_tasks
    from softprompts.model.load import load_base
    from softprompts.table import PromptTable
    from softprompts.tasks import TaskSpec

    pairs = []
    for item in args.data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SoftpromptsError(f"--data {item!r}: with --table, give NAME=FILE (a task of the table and its data)")
        if name in (n for n, _ in pairs):
            raise SoftpromptsError(f"--data names task {name!r} twice")
        pairs.append((name, path))
    table = PromptTable.load(args.table)
    for name, _ in pairs:
        table.info(name)  # a clear error for an unknown task, before loading a model
    base = load_base(args.model or table.base_meta["name"], device="auto")
    table.attach(base)
    tasks = []
    for name, path in pairs:
        task = table.info(name).get("task")
        if not task:
            raise SoftpromptsError(f"task {name!r} of {args.table} has no task metadata (template, labels): it "
                                   "cannot be evaluated")
        spec = TaskSpec.from_json(task)
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
