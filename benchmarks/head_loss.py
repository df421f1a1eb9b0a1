"""The LM head + cross-entropy of a training step, alone: HF's head + ``cross_entropy`` vs our fused, chunked head.

Both compute ``sum CE(W h + b, y)`` over ``N`` labelled rows and its gradient to ``h`` (``W`` frozen); see
``softprompts/model/head_loss.py`` for the math. Each repetition times one loss + backward of each system in
alternating order (median over repetitions, so machine noise hits both alike); peak tensor bytes are measured once
per system after a warm-up (``compare/latency.peak_bytes``: CUDA allocator peak, or the CPU allocator events).

Usage::

    python benchmarks/head_loss.py                 # CPU: SmolLM2's head (576 -> 49,152), 512 rows (2 x 256), fp32
    python benchmarks/head_loss.py --device cuda --anchor   # Llama-3.2-1B head (2048 -> 128,256), 8 x 256 rows, bf16
    python benchmarks/head_loss.py --json          # one JSON object
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from softprompts.compare.latency import peak_bytes
from softprompts.model.head_loss import CHUNK_BYTES, head_cross_entropy_sum


def systems(rows: int, hidden: int, vocab: int, dtype: torch.dtype, device: str) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
    states = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)  # [N, H]
    labels = torch.randint(0, vocab, (rows,), device=device)

    def hf() -> None:
        logits = head(states).float()  # [N, V]
        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
        states.grad = None

    def fused() -> None:
        head_cross_entropy_sum(states, head, labels).backward()
        states.grad = None

    return {"hf": hf, "fused": fused}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    runs = systems(args.rows, args.hidden, args.vocab, dtype, args.device)
    for step in runs.values():  # warm-up
        step()
    peaks = {name: peak_bytes(step, args.device) for name, step in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for rep in range(args.reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            sync(args.device)
            started = time.perf_counter()
            runs[name]()
            sync(args.device)
            times[name].append(time.perf_counter() - started)
    med = {name: statistics.median(t) for name, t in times.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"rows": args.rows, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
            or platform.machine(), "threads": torch.get_num_threads(), "reps": args.reps,
            "chunk_bytes": CHUNK_BYTES, "hf_s": med["hf"], "fused_s": med["fused"],
            "hf_over_fused_time": med["hf"] / med["fused"], "hf_peak_bytes": peaks["hf"],
            "fused_peak_bytes": peaks["fused"], "hf_over_fused_peak": peaks["hf"] / max(1, peaks["fused"]),
            "torch": torch.__version__, "commit": commit}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--anchor", action="store_true", help="Llama-3.2-1B head, 8 x 256 rows, bfloat16")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.anchor:
        args.rows, args.hidden, args.vocab, args.dtype = 8 * 256, 2048, 128256, "bfloat16"
    result = measure(args)
    if args.json:
        print(json.dumps(result))
        return
    mib = 2**20
    print(f"{args.rows} rows, {args.hidden} -> {args.vocab}, {args.dtype}, {result['device_name']}, "
          f"{result['threads']} threads, median of {args.reps} alternating reps, commit {result['commit']}")
    print("| system | loss + backward ms | peak MiB |")
    print("|---|---|---|")
    print(f"| HF head + cross_entropy | {result['hf_s'] * 1e3:.1f} | {result['hf_peak_bytes'] / mib:.0f} |")
    print(f"| fused chunked head (ours) | {result['fused_s'] * 1e3:.1f} | {result['fused_peak_bytes'] / mib:.0f} |")
    print(f"HF / fused: time {result['hf_over_fused_time']:.2f}x, peak {result['hf_over_fused_peak']:.2f}x")


if __name__ == "__main__":
    main()
