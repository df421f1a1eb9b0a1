"""``softprompts table add|remove|list|extract``: a prompt table holding many named tasks for one base model."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "table",
        help="manage a prompt table (many named tasks in one file set)",
        description="A prompt table is a directory with table.json + table.safetensors holding many named soft "
        "prompts and prefixes for one base model. Batches can mix its tasks row by row.",
    )
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    actions = parser.add_subparsers(dest="table_command", metavar="ACTION")

    p_add = actions.add_parser("add", help="add an adapter as a named task (creates the table if needed)")
    p_add.add_argument("table", help="table directory")
    p_add.add_argument("--name", required=True, help="task name: letters, digits, '_' or '-'")
    p_add.add_argument("--adapter", required=True, help="adapter directory, or OTHER_TABLE#NAME")
    p_add.add_argument("--replace", action="store_true", help="overwrite an existing task of that name")
    p_add.set_defaults(func=cmd_add)

    p_rm = actions.add_parser("remove", help="remove a named task")
    p_rm.add_argument("table", help="table directory")
    p_rm.add_argument("--name", required=True)
    p_rm.set_defaults(func=cmd_remove)

    p_list = actions.add_parser("list", help="list the tasks of a table")
    p_list.add_argument("table", help="table directory")
    p_list.add_argument("--json", action="store_true", help="print table.json's task metadata as JSON")
    p_list.set_defaults(func=cmd_list)

    p_ext = actions.add_parser("extract", help="write one task as a standalone adapter directory")
    p_ext.add_argument("table", help="table directory")
    p_ext.add_argument("--name", required=True)
    p_ext.add_argument("--out", required=True, help="output adapter directory")
    p_ext.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p_ext.set_defaults(func=cmd_extract)


def cmd_add(args: argparse.Namespace) -> int:
    from softprompts.table import PromptTable, resolve_adapter

    table = PromptTable.load(args.table, create=True)
    adapter = resolve_adapter(args.adapter)
    existed = args.name in table
    table.add(args.name, adapter, replace=args.replace)
    table.save()
    verb = "replaced" if existed else "added"
    print(f"{verb} {args.name!r} ({adapter.method}, {adapter.artifact.kind}, {adapter.num_virtual_tokens} virtual "
          f"tokens) in {table.path}: {len(table)} task(s)")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from softprompts.table import PromptTable

    table = PromptTable.load(args.table)
    table.remove(args.name)
    table.save()
    print(f"removed {args.name!r} from {table.path}: {len(table)} task(s) left")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import json

    from softprompts.table import PromptTable

    table = PromptTable.load(args.table)
    if args.json:
        print(json.dumps(table.metadata()["tasks"], indent=2))
        return 0
    base = table.base_model.name if table.base_model is not None else "-"
    print(f"{table.path}: {len(table)} task(s) for base model {base!r}")
    if not len(table):
        return 0
    rows = [["NAME", "METHOD", "ARTIFACT", "LENGTH", "PARAMS", "DTYPE", "TASK"]]
    for name in table.names():
        info = table.info(name)
        task = info.task.task if info.task is not None else "-"
        rows.append([name, info.method, info.artifact, str(info.num_virtual_tokens),
                     f"{info.num_parameters:,}", info.dtype, str(task)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from softprompts.adapter_io import save_adapter
    from softprompts.files import check_output
    from softprompts.table import PromptTable

    check_output(args.out, overwrite=args.overwrite)
    table = PromptTable.load(args.table)
    out = save_adapter(table.adapter(args.name), args.out, overwrite=args.overwrite)
    print(f"wrote task {args.name!r} to {out}")
    return 0
