"""``softprompts inspect DIR``: what an adapter is (method, base, sizes, template, labels, training summary).

DIR may also be a prompt-table task, ``TABLE_DIR#NAME`` (or ``table:NAME`` with ``--table``): its stored metadata
(a table keeps no training record)."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("inspect", help="describe a saved adapter", description=__doc__)
    p.add_argument("adapter", metavar="DIR", help="adapter directory, TABLE_DIR#NAME, or table:NAME with --table")
    p.add_argument("--table", default=None, help="prompt table directory for table:NAME")
    p.add_argument("--json", action="store_true", help="print adapter.json and the training record as JSON")
    p.set_defaults(func=run)


def summary(directory: str | Path, table: str | Path | None = None) -> dict:
    """Metadata of an adapter directory (``metadata``: ``adapter.json`` as written; ``record``: the codec's typed
    ``AdapterRecord``) plus its training record (if any); reads no tensors and no model. A prompt-table reference
    (``TABLE_DIR#NAME``, ``table:NAME``) gives the task's metadata, no training record."""
    from softprompts.adapter_io import WEIGHTS_FILE
    from softprompts.codec import adapter_json, read_adapter_record
    from softprompts.table import TABLE_REF, resolve_adapter
    from softprompts.training import RECORD_FILE

    if not Path(directory).is_dir() and ("#" in str(directory) or str(directory).startswith(TABLE_REF)):
        saved = resolve_adapter(directory, table=table).record()
        return {"metadata": adapter_json(saved), "record": saved, "file_bytes": None, "training": None}
    directory = Path(directory)
    saved = read_adapter_record(directory)
    weights = directory / WEIGHTS_FILE
    record_path = directory / RECORD_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    return {"metadata": adapter_json(saved), "record": saved,
            "file_bytes": weights.stat().st_size if weights.is_file() else None, "training": record}


def run(args) -> int:
    info = summary(args.adapter, args.table)
    saved, rec = info.pop("record"), info["training"]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    task = saved.task
    lines = [
        f"adapter      {args.adapter}",
        f"method       {saved.method} ({saved.artifact}, {saved.num_virtual_tokens} virtual tokens)",
        f"base model   {saved.base.name} ({saved.base.shapes.model_type})",
        f"parameters   {saved.num_parameters:,} saved ({saved.dtype})"
        + (f", file {info['file_bytes']:,} bytes" if info["file_bytes"] is not None else ""),
    ]
    if task is not None:
        lines.append(f"task         {task.task}")
        if task.chat is not None:
            lines.append(f"prompts      the model's chat template, virtual tokens at {task.chat.placement!r}"
                         + (f", system {task.chat.system!r}" if task.chat.system else ""))
        else:
            lines.append(f"template     {task.prompt!r} -> {task.target!r}")
        if task.labels:
            lines.append(f"labels       {', '.join(task.labels)}")
    if rec:
        t = rec["timings"]
        lines.append(f"trained      {rec['steps_done']} steps, {rec['trainable_parameters']:,} trainable parameters, "
                     f"{t['train_seconds']:.1f}s, {t['tokens_per_second']:.0f} tokens/s, "
                     f"lr {rec['train_config']['lr']}")
        if rec.get("best_dev") is not None:
            base_dev = (rec.get("base_model_dev") or {}).get(rec["metric"].removeprefix("dev_"))
            ref = f" (base model without adapter: {base_dev:.4f})" if base_dev is not None else ""
            lines.append(f"best         {rec['metric']} {rec['best_dev']:.4f} at step {rec['best_step']}{ref}")
    print("\n".join(lines))
    return 0
