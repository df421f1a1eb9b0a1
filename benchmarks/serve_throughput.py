"""Serving throughput: our mixed-adapter engine vs PEFT (one adapter's group at a time), and cached soft-prompt KV.

    python benchmarks/serve_throughput.py                              # CPU, embedded SmolLM2-135M
    python benchmarks/serve_throughput.py --device cuda --model-shape llama-1b --dtype bfloat16 --requests 64 \
        --new-tokens 64 --prompt-tokens 128                             # GPU, random-init Llama-3.2-1B shape

For each number of distinct adapters per batch (``--adapters 1,4,16``), ``--requests`` requests are spread
round-robin over that many adapters (``--method prompt``: soft prompts, or ``prefix``: KV prefixes;
``--virtual-tokens`` each), all with prompts of
``--prompt-tokens`` random ids, greedy, exactly ``--new-tokens`` new tokens (no early stop):

* ours: ``Engine.generate`` over all requests in one mixed batch (soft prompts served as their cached KV);
* PEFT: ``get_peft_model`` + ``add_adapter`` with the same tensors (``PromptTuningConfig``, or
  ``PrefixTuningConfig(prefix_projection=False)`` holding our KV in PEFT's layout), and HF ``generate`` per group
  (PEFT refuses mixed batches for prompt-learning methods: ``adapter_names`` is LoRA-only);
* HF ``generate`` on the base model with all requests in one batch (no adapter: the ceiling).

Also: time to first token (one-token generation of the whole batch) with the soft prompts served as cached KV vs
recomputed in every prefill. Prints a Markdown table and a JSON line; ``--json PATH`` writes it too.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import softprompts as sp  # noqa: E402
from softprompts.model.decoder.base import BaseModel  # noqa: E402
from softprompts.model.generation import GenerationRequest  # noqa: E402
from softprompts.serve.engine import Engine  # noqa: E402

SHAPES = {
    # Llama-3.2-1B: 16 layers, hidden 2048, 32 heads / 8 KV heads (head dim 64), MLP 8192, vocab 128256, tied
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def build_base(args) -> BaseModel:
    dtype = getattr(torch, args.dtype)
    if args.model_shape:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES[args.model_shape], max_position_embeddings=4096)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device)
        return BaseModel(model=model, tokenizer=None, name=f"random-{args.model_shape}")
    return sp.load_base(args.model, dtype=dtype, device=args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeat`` runs (after a warm-up run) and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def peft_model(base: BaseModel, artifacts: list) -> object:
    """A PEFT model on a copy of the base, one named adapter per artifact holding the same values."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from softprompts.interop.peft_export import prefix_to_peft_rows

    model = copy.deepcopy(base.model)
    length = artifacts[0].length
    if artifacts[0].kind == "soft_prompt":
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length)
        rows = [a.embeds for a in artifacts]
    else:
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length, prefix_projection=False)
        rows = [prefix_to_peft_rows(a) for a in artifacts]  # [P, L * 2 * H * D], PEFT's layout
    peft = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, len(artifacts)):
        peft.add_adapter(f"a{i}", config)
    with torch.no_grad():
        for i, row in enumerate(rows):
            peft.prompt_encoder[f"a{i}"].embedding.weight.copy_(row.to(base.dtype))
    peft.eval()
    return peft


def run(args) -> dict:
    torch.manual_seed(0)
    base = build_base(args)
    device = str(base.device)
    vocab = base.shapes.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(100, vocab - 100, (args.requests, args.prompt_tokens), generator=gen)
    engine = Engine(base, max_batch=args.requests)
    counts = [int(c) for c in args.adapters.split(",")]
    init = "vocab" if args.method == "prompt" else "random"
    softs = [  # the adapters' artifacts: soft prompts or KV prefixes
        sp.create_method(base, args.method, num_virtual_tokens=args.virtual_tokens, init=init, seed=i).materialize()
        for i in range(max(counts))
    ]
    start = time.perf_counter()
    kvs = [engine.prepare(s) for s in softs]
    sync(device)
    convert_s = (time.perf_counter() - start) / len(softs)
    new = args.new_tokens
    total_tokens = args.requests * new
    rows = []
    peft = None if args.skip_peft else peft_model(base, softs)
    ids = prompts.to(device)
    mask = torch.ones_like(ids)

    hf_s, _ = timed(lambda: base.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                                min_new_tokens=new, do_sample=False, pad_token_id=0), device)
    for n in counts:
        owner = [i % n for i in range(args.requests)]
        reqs = [GenerationRequest(prompts[i].tolist(), kvs[owner[i]], new, stop_ids=frozenset())
                for i in range(args.requests)]
        ours_s, ours_out = timed(lambda reqs=reqs: engine.generate(reqs), device, args.repeat)
        row = {"adapters": n, "ours_s": round(ours_s, 3), "ours_tok_s": round(total_tokens / ours_s, 1)}
        if peft is not None:
            def peft_run(n=n, owner=owner):
                outputs = {}
                for a in range(n):
                    group = [i for i in range(args.requests) if owner[i] == a]
                    if not group:  # fewer requests than adapters
                        continue
                    peft.set_adapter(f"a{a}")
                    out = peft.generate(input_ids=ids[group], attention_mask=mask[group], max_new_tokens=new,
                                        min_new_tokens=new, do_sample=False, pad_token_id=0)
                    for j, i in enumerate(group):
                        outputs[i] = out[j, -new:].tolist()
                return outputs

            peft_s, peft_out = timed(peft_run, device, args.repeat)
            same = sum(peft_out[i] == ours_out[i].tokens for i in range(args.requests))
            row.update(peft_s=round(peft_s, 3), peft_tok_s=round(total_tokens / peft_s, 1),
                       speedup=round(peft_s / ours_s, 2), same_tokens=f"{same}/{args.requests}")
        rows.append(row)

    # time to first token (soft prompts only): the whole batch over the largest adapter count, cached KV vs the
    # soft prompt recomputed in every prefill
    ttft = {}
    if args.method == "prompt":
        n = max(counts)
        cached = [GenerationRequest(prompts[i].tolist(), kvs[i % n], 1, stop_ids=frozenset())
                  for i in range(args.requests)]
        recomputed = [GenerationRequest(prompts[i].tolist(), softs[i % n], 1, stop_ids=frozenset())
                      for i in range(args.requests)]
        cached_s, a = timed(lambda: engine.generate(cached), device, args.repeat)
        soft_s, b = timed(lambda: engine.generate(recomputed), device, args.repeat)
        ttft = {"ttft_cached_kv_s": round(cached_s, 4), "ttft_recompute_s": round(soft_s, 4),
                "ttft_same_tokens": [x.tokens for x in a] == [y.tokens for y in b],
                "soft_prompt_to_kv_once_s": round(convert_s, 4)}
    return {
        "model": base.name,
        "method": args.method,
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "requests": args.requests,
        "prompt_tokens": args.prompt_tokens,
        "virtual_tokens": args.virtual_tokens,
        "new_tokens": new,
        "hf_generate_base_tok_s": round(total_tokens / hf_s, 1),
        "rows": rows,
        **ttft,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "commit": _commit(),
    }


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def table(result: dict) -> str:
    lines = ["| distinct adapters | ours tok/s | PEFT tok/s | speedup | same greedy tokens |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['adapters']} | {r['ours_tok_s']} | {r.get('peft_tok_s', '-')} | "
                     f"{r.get('speedup', '-')}x | {r.get('same_tokens', '-')} |")
    lines.append(f"\n{result['method']} adapters. HF generate, base model, one batch: "
                 f"{result['hf_generate_base_tok_s']} tok/s.")
    if "ttft_cached_kv_s" in result:
        lines.append(f"Time to first token (batch of {result['requests']}): cached KV {result['ttft_cached_kv_s']} s "
                     f"vs recomputed soft prompt {result['ttft_recompute_s']} s (same tokens: "
                     f"{result['ttft_same_tokens']}); one-time conversion {result['soft_prompt_to_kv_once_s']} s per "
                     "adapter.")
    return "\n".join(lines)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags every serving benchmark takes: which model (embedded, or a random-init shape), device, dtype."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--model-shape", choices=sorted(SHAPES), default=None, help="random-init model of this shape")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None, help="also write the result here")


def write_result(result: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--virtual-tokens", type=int, default=16)
    p.add_argument("--adapters", default="1,4,16")
    p.add_argument("--method", choices=["prompt", "prefix"], default="prompt", help="soft prompts or KV prefixes")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per measurement (best is kept)")
    p.add_argument("--skip-peft", action="store_true")
    args = p.parse_args(argv)
    result = run(args)
    print(table(result))
    print(json.dumps(result))
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
