"""``softprompts export --adapter DIR --format peft|vllm --out OUT``: write an adapter in another library's format."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="export an adapter for another library (PEFT, vLLM)",
        description="--format peft: adapter_config.json + adapter_model.safetensors that "
        "peft.PeftModel.from_pretrained loads: soft prompts (prompt tuning, P-tuning) as PROMPT_TUNING, KV prefixes "
        "(prefix tuning, deep prompts) as "
        "PREFIX_TUNING without projection; outputs equal ours for unpadded and right-padded inputs. --format vllm "
        "(soft prompts only): soft_prompt.safetensors + vllm.json, for vLLM's prompt_embeds input "
        "(softprompts.interop.vllm builds the request).",
    )
    parser.add_argument(
        "--adapter", required=True, help="adapter directory, or TABLE_DIR#NAME for a task of a prompt table"
    )
    parser.add_argument("--format", default="peft", choices=["peft", "vllm"], help="target format (default: peft)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softprompts.files import check_output
    from softprompts.table import resolve_adapter

    check_output(args.out, overwrite=args.overwrite)
    adapter = resolve_adapter(args.adapter)
    if args.format == "vllm":
        from softprompts.interop.vllm import export_vllm

        out = export_vllm(adapter, args.out, overwrite=args.overwrite)
        hidden = adapter.base_shapes.hidden_size
        offsets = getattr(adapter.artifact, "offsets", None)  # DePT: offsets on the prompt's first S token embeddings
        extra = (f", plus offsets [{offsets.positions}, {hidden}] added to the prompt's first {offsets.positions} "
                 "token embeddings (load_offsets)" if offsets is not None else "")
        print(f"wrote {out} (soft prompt [{adapter.num_virtual_tokens}, {hidden}]{extra} for vLLM's "
              "prompt_embeds; build requests with softprompts.interop.vllm.prompt_embeds and completion_request, "
              "on a vLLM server started with --enable-prompt-embeds)")
        return 0
    from softprompts.interop import export_peft, to_peft

    config, tensors = to_peft(adapter)
    out = export_peft(adapter, args.out, overwrite=args.overwrite)
    shape = tuple(tensors["prompt_embeddings"].shape)
    print(
        f"wrote {out} ({config['peft_type']}, {adapter.num_virtual_tokens} virtual tokens, prompt_embeddings {shape}); "
        f"load with peft.PeftModel.from_pretrained(model, {str(out)!r})"
    )
    return 0
