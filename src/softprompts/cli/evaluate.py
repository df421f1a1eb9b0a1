"""``softprompts eval``: metrics of a saved adapter on a task file (template and labels come from the adapter)."""

from __future__ import annotations

import json

from softprompts.errors import SoftpromptsError


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an adapter on a data file", description=__doc__)
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--data", required=True, help="evaluation data: .jsonl, .csv or .tsv")
    p.add_argument("--model", default=None, help="base model (default: the adapter's own base model)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation tasks: decoding limit")
    p.add_argument("--json", action="store_true", help="print one JSON object with the metrics and n")
    p.set_defaults(func=run)


def load_adapter_and_base(directory: str, model: str | None = None):
    """(adapter, base, spec) for an adapter directory; the base is the adapter's own unless ``model`` is given."""
    from softprompts.adapter_io import load_adapter, read_metadata
    from softprompts.model.load import load_base
    from softprompts.tasks import TaskSpec

    meta = read_metadata(directory)
    base = load_base(model or meta["base_model"]["name"])
    adapter = load_adapter(directory, base)
    spec = TaskSpec.from_json(adapter.task) if adapter.task else None
    return adapter, base, spec


def run(args) -> int:
    from softprompts.data.datasets import load_task_data
    from softprompts.evaluate import evaluate

    adapter, base, spec = load_adapter_and_base(args.adapter, args.model)
    if spec is None:
        raise SoftpromptsError(f"{args.adapter} has no task metadata (template, labels): it cannot be evaluated")
    examples, _ = load_task_data(args.data, spec.template, spec.task, spec.labels)
    metrics = evaluate(base, adapter, examples, spec, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return 0
