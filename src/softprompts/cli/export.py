"""``softprompts export --adapter DIR --format peft --out OUT``: write an adapter in another library's format."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="export an adapter for another library (PEFT)",
        description="Write adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained loads: "
        "soft prompts (prompt tuning, P-tuning) as PROMPT_TUNING, KV prefixes (prefix tuning, deep prompts) as "
        "PREFIX_TUNING without projection. Outputs equal ours for unpadded and right-padded inputs.",
    )
    parser.add_argument(
        "--adapter", required=True, help="adapter directory, or TABLE_DIR#NAME for a task of a prompt table"
    )
    parser.add_argument("--format", default="peft", choices=["peft"], help="target format (default: peft)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softprompts.files import check_output
    from softprompts.interop import export_peft, to_peft
    from softprompts.table import resolve_adapter

    check_output(args.out, overwrite=args.overwrite)
    adapter = resolve_adapter(args.adapter)
    config, tensors = to_peft(adapter)
    out = export_peft(adapter, args.out, overwrite=args.overwrite)
    shape = tuple(tensors["prompt_embeddings"].shape)
    print(
        f"wrote {out} ({config['peft_type']}, {adapter.num_virtual_tokens} virtual tokens, prompt_embeddings {shape}); "
        f"load with peft.PeftModel.from_pretrained(model, {str(out)!r})"
    )
    return 0
