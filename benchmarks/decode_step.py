"""One decode step: ours vs HF ``generate`` vs the compute floor (the step's matmuls alone), side by side, one run.

    python benchmarks/decode_step.py                          # CPU, embedded SmolLM2-135M fp32, batches 1,4,16,64
    python benchmarks/decode_step.py --device cuda --model-shape llama-1b --dtype bfloat16
    python benchmarks/decode_step.py --profile 16             # where a step's time goes at batch 16
    python benchmarks/decode_step.py --dtypes float32,bfloat16 --batches 1,8,32 --skip-hf   # dtypes interleaved
    python benchmarks/decode_step.py --regional-compile --batches 1,8,32 --skip-hf   # + norms/MLP compiled

Per batch size B (``--batches``), prompts of ``--prompt-tokens`` random ids, greedy, no early stop:

* **ms per decode step** of a path = (time to generate ``--long`` tokens - time to generate ``--short``) /
  (long - short): prefill and setup cancel out;
* **ours**: ``decode_batch`` (the server's decode loop, ``model/decode.DecodeBatch``);
* **HF**: ``model.generate`` (``min_new_tokens = max_new_tokens``);
* **floor**: every ``nn.Linear`` of the model (attention projections, MLP, LM head) applied once to a ``[B, in]``
  input with the model's own weights, back to back: the matmul work one step cannot avoid (at batch 1 it is
  reading every weight once).

``--dtypes float32,bfloat16`` (``auto`` too: ``model/load.auto_dtype``) loads the model once per dtype and measures
them in turn at each batch size, so their ratio (the last column: this dtype's step / the first dtype's) comes from
one run on the same cores. Each figure is the best of ``--repeat`` runs. Prints a Markdown table (ours / floor and
HF / floor ratios) and a JSON line. ``--profile B``: ``torch.profiler`` over decode steps at batch B, time grouped
by kind (matmul, attention, KV cache copies, elementwise, Python / other), per dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from serve_throughput import _commit, add_model_args, build_base, sync, write_result  # noqa: E402

from softprompts.model.decode_loop import decode_batch  # noqa: E402
from softprompts.model.decoder.decode import DecodeBatch  # noqa: E402
from softprompts.model.generation import GenerationRequest  # noqa: E402
from softprompts.model.load import dtype_name, resolve_dtype  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_of(fn, device: str, repeat: int, clock=time.perf_counter) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = clock()
        fn()
        sync(device)
        best = min(best, clock() - start)
    return best


def per_step(run, short: int, long: int, device: str, repeat: int, clock=time.perf_counter) -> float:
    """Seconds per decode step: the difference of a long and a short generation over the extra steps."""
    return (best_of(lambda: run(long), device, repeat, clock) - best_of(lambda: run(short), device, repeat, clock)) / (
        long - short)


def floor_step(base, batch: int, device: str, repeat: int, steps: int = 20, clock=time.perf_counter) -> float:
    """Seconds for every linear layer once at batch ``batch`` (the matmuls of one decode step)."""
    linears = [m for m in base.model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(batch, m.in_features, device=base.device, dtype=base.dtype) for m in linears]

    def run() -> None:
        with torch.no_grad():
            for _ in range(steps):
                for m, x in zip(linears, inputs, strict=True):
                    F.linear(x, m.weight, m.bias)

    return best_of(run, device, repeat, clock) / steps


def measure(base, batch: int, args) -> dict:
    device = str(base.device)
    vocab = base.shapes.vocab_size
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(100, vocab - 100, (batch, args.prompt_tokens), generator=gen)
    ids = prompts.to(base.device)
    mask = torch.ones_like(ids)

    def ours(new: int) -> None:
        decode_batch(base, [GenerationRequest(p.tolist(), None, new, stop_ids=frozenset()) for p in prompts])

    def hf(new: int) -> None:
        with torch.no_grad():
            base.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=0)

    clock = CLOCKS[args.clock]
    floor = floor_step(base, batch, device, args.repeat, clock=clock)
    row = {"batch": batch, "floor_ms": floor * 1e3}
    row["ours_ms"] = per_step(ours, args.short, args.long, device, args.repeat, clock) * 1e3
    if not args.skip_hf:
        row["hf_ms"] = per_step(hf, args.short, args.long, device, args.repeat, clock) * 1e3
    if args.hf_static:
        def hf_static(new: int) -> None:  # transformers' own static cache (preallocated, written in place)
            with torch.no_grad():
                base.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                    do_sample=False, pad_token_id=0, cache_implementation="static")

        row["hf_static_ms"] = per_step(hf_static, args.short, args.long, device, args.repeat, clock) * 1e3
        row["hf_static_over_floor"] = row["hf_static_ms"] / row["floor_ms"]
    row["ours_over_floor"] = row["ours_ms"] / row["floor_ms"]
    if "hf_ms" in row:
        row["hf_over_floor"] = row["hf_ms"] / row["floor_ms"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


KINDS = [  # (kind, substrings of profiler op names), first match wins
    ("matmul", ("addmm", "mm", "matmul", "linear", "bmm")),
    ("attention", ("scaled_dot_product", "flash", "softmax", "_efficient_attention")),
    ("kv cache copies", ("cat", "index_select", "index_copy", "copy_", "clone", "contiguous", "pad")),
    ("elementwise", ("mul", "add", "sub", "div", "rsqrt", "pow", "mean", "silu", "neg", "cos", "sin", "exp",
                     "where", "masked", "argmax", "to", "fill", "zeros", "ones", "arange", "empty")),
]


def profile(base, batch: int, args) -> dict:
    """Self time per op over decode steps at ``batch``, grouped by kind, with the wall time per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, base.shapes.vocab_size - 100, (batch, args.prompt_tokens), generator=gen)
    reqs = [GenerationRequest(p.tolist(), None, 1_000, stop_ids=frozenset()) for p in prompts]
    decode = DecodeBatch(base, frozenset())
    decode.add(reqs)
    for _ in range(4):
        decode.step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if base.device.type == "cuda" else [])
    steps = args.long - args.short
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            decode.step()
        sync(str(base.device))
        wall = (time.perf_counter() - start) / steps
    groups: dict[str, float] = defaultdict(float)
    top = []
    for event in prof.key_averages():
        if event.key.startswith("ProfilerStep"):
            continue
        self_us = event.self_cpu_time_total
        name = event.key.removeprefix("aten::")
        kind = next((k for k, subs in KINDS if any(s in name for s in subs)), "other ops")
        groups[kind] += self_us
        top.append((self_us, event.key, event.count))
    total_ops = sum(groups.values()) / steps / 1e3
    result = {
        "batch": batch,
        "wall_ms_per_step": round(wall * 1e3, 2),
        "ops_ms_per_step": {k: round(v / steps / 1e3, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "python_and_dispatch_ms_per_step": round(wall * 1e3 - total_ops, 2),
        "top_ops": [{"op": k, "ms_per_step": round(us / steps / 1e3, 3), "calls_per_step": c // steps}
                    for us, k, c in sorted(top, reverse=True)[:15]],
    }
    return result


def table(rows: list[dict]) -> str:
    static = any("hf_static_ms" in r for r in rows)
    lines = ["| batch | dtype | floor ms | ours ms | ours / floor | HF generate ms | HF / floor | ours / first dtype |"
             + (" HF static-cache ms | HF static / floor |" if static else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if static else "")]
    nan = float("nan")
    for r in rows:
        lines.append(f"| {r['batch']} | {r['dtype']} | {r['floor_ms']:.1f} | {r['ours_ms']:.1f} | "
                     f"{r['ours_over_floor']:.2f}x | {r.get('hf_ms', nan):.1f} | "
                     f"{r.get('hf_over_floor', nan):.2f}x | {r['ours_over_first_dtype']:.2f}x |"
                     + (f" {r.get('hf_static_ms', nan):.1f} | {r.get('hf_static_over_floor', nan):.2f}x |"
                        if static else ""))
    return "\n".join(lines)


def compile_regions(base) -> None:
    """``torch.compile`` (dynamic shapes) each decoder layer's RMSNorms and MLP in place, the element-wise work
    between the matmuls; attention and the cache stay eager (one graph per module class, shared by the layers)."""
    inner = base.model.get_decoder()
    for layer in inner.layers:
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            getattr(layer, name).compile(dynamic=True)
    inner.norm.compile(dynamic=True)


def measure_dtypes(bases: dict, batches: list[int], args) -> list[dict]:
    """``measure`` at each batch size for each dtype in turn (interleaved: drift in the machine's load hits both),
    each row with its step time over the first dtype's at that batch."""
    rows = []
    for batch in batches:
        first = None
        for name, base in bases.items():
            row = {"dtype": name, **measure(base, batch, args)}
            first = first or row["ours_ms"]
            row["ours_over_first_dtype"] = round(row["ours_ms"] / first, 3)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--short", type=int, default=8)
    p.add_argument("--long", type=int, default=40)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--profile", type=int, default=None, metavar="B", help="profile decode steps at batch B instead")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time (default) or this process's "
                   "CPU time: on cores shared with other jobs, with OMP_NUM_THREADS=1, CPU time is what a quiet core "
                   "would take (less the cache and memory traffic the others cause)")
    p.add_argument("--hf-static", action="store_true", help="also HF generate with transformers' static cache "
                   "(cache_implementation='static': preallocated, written in place)")
    p.add_argument("--regional-compile", action="store_true", help="also measure each dtype with its layers' norms "
                   "and MLP compiled (torch.compile, dynamic shapes), side by side with the eager step")
    p.add_argument("--compile-forward", action="store_true", help="with --hf-static: also a base whose forward is "
                   "compiled, measured on every path (the static-cache path is where it can hold one graph)")
    p.add_argument("--dtypes", default=None, help="comma-separated dtypes measured in turn at each batch, e.g. "
                   "float32,bfloat16 (default: --dtype)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    names = [dtype_name(resolve_dtype(d, torch.device(args.device))) for d in (args.dtypes or args.dtype).split(",")]
    bases = {name: build_base(argparse.Namespace(**{**vars(args), "dtype": name})) for name in names}
    if args.hf_static and args.compile_forward:
        for name in names:
            bases[f"{name}+compiled"] = build_base(argparse.Namespace(**{**vars(args), "dtype": name}))
            bases[f"{name}+compiled"].model.forward = torch.compile(bases[f"{name}+compiled"].model.forward)
    if args.regional_compile:
        for name in names:
            bases[f"{name}+regional"] = build_base(argparse.Namespace(**{**vars(args), "dtype": name}))
            compile_regions(bases[f"{name}+regional"])
    base = next(iter(bases.values()))
    info = {"model": base.name, "device": str(base.device), "dtype": ",".join(names),
            "threads": torch.get_num_threads(), "prompt_tokens": args.prompt_tokens, "commit": _commit(),
            "torch": torch.__version__, "clock": args.clock, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if args.profile:
        result = {**info, "profile": {name: profile(b, args.profile, args) for name, b in bases.items()}}
        print(json.dumps(result, indent=2))
    else:
        rows = measure_dtypes(bases, [int(b) for b in args.batches.split(",")], args)
        result = {**info, "rows": rows}
        print(table(rows))
        print(json.dumps(result))
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
