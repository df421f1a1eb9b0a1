"""``softprompts eval``: metrics of an adapter, or of the bare model, on a task file.

With ``--adapter`` the task (classify or generate, template and target, labels, chat placement and system message)
is the one the adapter recorded, and every task flag given replaces that part of it: ``--data other.jsonl
--template T --target T2`` scores the adapter on another task. Without ``--adapter`` the bare model is scored
(``--model``, default smollm2-135m) on the task the flags describe: ``--template`` and ``--target`` (``--task``
default classify, ``--labels`` default the labels found in the data), or rows holding ``messages`` (chat data,
rendered with the model's chat template as ``train`` renders them, ``--placement`` / ``--system`` as in ``train``).
An adapter's recorded labels stay unless ``--template`` / ``--target`` give another task: then ``--labels``, or the
labels found in the data. Bare-model and adapter metrics come from the
same code (``softprompts.evaluate.evaluate``), so they compare. The flags become one request, run by
``workflow.evaluate_files`` (``sp.evaluate_files`` in Python) or ``workflow.evaluate_table``.

``--adapter`` is an adapter directory, ``TABLE_DIR#NAME`` (a task of a prompt table) or ``table:NAME`` with
``--table``. ``--table TABLE --data NAME=FILE --data NAME2=FILE2`` evaluates several tasks of a prompt table at once,
each with the task it recorded: their rows share batches (one forward per batch, each row with its own task's prompt)
and each task's metrics are those it gets alone.
"""

from __future__ import annotations

import json

from softprompts.cli.arguments import add_dtype_flag, add_quantize_flag, say_dtype
from softprompts.cli.task_inputs import add_chat_flags, label_list
from softprompts.errors import SoftpromptsError

TASK_FLAGS = ("task", "template", "target", "labels", "placement", "system")


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
    add_dtype_flag(p)
    p.set_defaults(func=run)


def _format(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def run(args) -> int:
    from softprompts.workflow import EvalFiles, Source, TaskFlags, evaluate_files, evaluate_table

    source = Source(args.adapter, args.model, args.table, args.quantize, args.dtype)
    say_dtype(args.dtype)
    if args.adapter is None and args.table is not None:  # --table TABLE --data NAME=FILE ...
        given = [f"--{name}" for name in TASK_FLAGS if getattr(args, name) is not None]
        if given:
            raise SoftpromptsError(f"{', '.join(given)}: with --table and --data NAME=FILE each task is evaluated on "
                                   "the task it recorded; to score one of them on another task, use --adapter "
                                   "TABLE#NAME")
        results = evaluate_table(source, _table_pairs(args.data), args.batch_size, args.max_new_tokens)
        print(json.dumps(results) if args.json else "\n".join(f"{name}: {_format(metrics)}"
                                                               for name, metrics in results.items()))
        return 0
    if len(args.data) != 1:
        raise SoftpromptsError("--data is given once (use --table and --data NAME=FILE for several tasks)")
    flags = TaskFlags(args.task, args.template, args.target, label_list(args.labels), args.placement, args.system)
    metrics = evaluate_files(EvalFiles(args.data[0], source, flags, args.batch_size, args.max_new_tokens))
    print(json.dumps(metrics) if args.json else _format(metrics))
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
