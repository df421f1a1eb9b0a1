"""``softprompts import --peft DIR --out OUT [--model M]``: read a PEFT prompt-learning adapter into our format."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "import",
        help="import a PEFT prompt tuning / P-tuning / prefix tuning adapter",
        description="Read a PEFT adapter directory (adapter_config.json + adapter_model.safetensors; PROMPT_TUNING, "
        "P_TUNING or PREFIX_TUNING, GQA included) and save it as a softprompts adapter for the base model.",
    )
    parser.add_argument("--peft", required=True, help="the PEFT adapter directory (what save_pretrained wrote)")
    parser.add_argument("--out", required=True, help="output adapter directory")
    parser.add_argument(
        "--model", default=None, help="base model the adapter was trained on (default: the embedded smollm2-135m)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softprompts.adapter_io import save_adapter
    from softprompts.files import check_output
    from softprompts.interop import import_peft, read_peft
    from softprompts.model.load import DEFAULT_MODEL, load_base

    check_output(args.out, overwrite=args.overwrite)  # before the model loads

    read_peft(args.peft)  # validate the files before loading a model
    base = load_base(args.model or DEFAULT_MODEL)
    adapter = import_peft(args.peft, base)
    out = save_adapter(adapter, args.out, overwrite=args.overwrite)
    print(
        f"wrote {out} ({adapter.method}, {adapter.artifact.kind}, {adapter.num_virtual_tokens} virtual tokens, "
        f"{adapter.num_parameters:,} parameters) for base model {base.name!r}"
    )
    return 0
