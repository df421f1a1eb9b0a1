"""Open-loop load: Poisson arrivals over 16 adapters, continuous batching vs window batching, same arrivals.

    python benchmarks/load_open_loop.py                        # CPU, embedded SmolLM2-135M, 16 adapters
    python benchmarks/load_open_loop.py --device cuda --model-shape llama-1b --dtype bfloat16 --requests 400

The workload (fixed by ``--seed``): ``--requests`` requests, each on one of ``--adapters`` adapters (half soft
prompts, half KV prefixes, ``--virtual-tokens`` each), a prompt of uniform ``[--min-prompt, --max-prompt]`` random
ids and uniform ``[--min-new, --max-new]`` new tokens (greedy, no early stop).

1. **capacity** of each scheduler: the whole workload submitted at once; requests completed per second;
2. **open loop** at ``--load`` (default 0.7) x the LOWER of the two capacities, so both schedulers can sustain the
   rate and their throughputs are equal: requests arrive as a Poisson process (exponential gaps, one arrival
   sequence for both) whatever the server does, as real clients do;
3. per scheduler: achieved requests/s and tokens/s, p50/p95 time to first token (arrival -> first token, queueing
   included) and p50/p95 latency; the p95-TTFT ratio continuous / window; and whether every request got the same
   tokens under both (each row's tokens are what it gets alone).

Both are ``serve/scheduler.Scheduler``: continuous (rows join and leave between steps, ``--max-running``) and window
(``tests/window_scheduler.py``: a batch formed from the requests arriving within ``--window-ms`` of the first, run to
its end).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # window_scheduler.py: the tests' reference

from serve_throughput import _commit, add_model_args, build_base, write_result  # noqa: E402
from window_scheduler import WindowScheduler  # noqa: E402

import softprompts as sp  # noqa: E402
from softprompts.model.generation import GenerationRequest  # noqa: E402
from softprompts.serve.engine import Engine  # noqa: E402
from softprompts.serve.scheduler import Scheduler  # noqa: E402


def workload(args, vocab: int) -> list[dict]:
    rng = random.Random(args.seed)
    items = []
    for i in range(args.requests):
        length = rng.randint(args.min_prompt, args.max_prompt)
        items.append({"adapter": i % args.adapters, "prompt": [rng.randrange(100, vocab - 100) for _ in range(length)],
                      "new": rng.randint(args.min_new, args.max_new)})
    return items


def adapters(base, engine: Engine, args) -> list:
    out = []
    for i in range(args.adapters):
        method = "prompt" if i % 2 == 0 else "prefix"
        m = sp.create_method(base, method, num_virtual_tokens=args.virtual_tokens,
                             init="vocab" if method == "prompt" else "random", seed=i)
        out.append(engine.prepare(m.materialize()))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def drive(scheduler: Scheduler, items: list[dict], arts: list, gaps: list[float] | None) -> dict:
    """Submit ``items`` at the arrival times ``cumsum(gaps)`` (``None``: all at once); wait for every answer."""
    first: dict[int, float] = {}
    arrival: dict[int, float] = {}
    done: dict[int, float] = {}
    tokens: dict[int, list[int]] = {}
    finished = threading.Event()
    lock = threading.Lock()

    def on_done(i: int, future) -> None:
        with lock:
            done[i] = time.perf_counter()
            tokens[i] = future.result().tokens
            if len(done) == len(items):
                finished.set()

    start = time.perf_counter()
    at = 0.0
    for i, item in enumerate(items):
        if gaps is not None:
            at += gaps[i]
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        arrival[i] = start + at if gaps is not None else start

        def on_token(tok, lp, i=i) -> None:
            first.setdefault(i, time.perf_counter())

        req = GenerationRequest(item["prompt"], arts[item["adapter"]], item["new"], stop_ids=frozenset(),
                                on_token=on_token)
        scheduler.submit(req).add_done_callback(lambda f, i=i: on_done(i, f))
    finished.wait()
    wall = max(done.values()) - start
    ttft = [first[i] - arrival[i] for i in range(len(items))]
    latency = [done[i] - arrival[i] for i in range(len(items))]
    generated = sum(len(t) for t in tokens.values())
    return {
        "requests_per_s": round(len(items) / wall, 3),
        "tokens_per_s": round(generated / wall, 1),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p95_s": round(percentile(ttft, 0.95), 3),
        "latency_p50_s": round(statistics.median(latency), 3),
        "latency_p95_s": round(percentile(latency, 0.95), 3),
        "wall_s": round(wall, 2),
        "_tokens": [tokens[i] for i in range(len(items))],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--virtual-tokens", type=int, default=16)
    p.add_argument("--min-prompt", type=int, default=8)
    p.add_argument("--max-prompt", type=int, default=64)
    p.add_argument("--min-new", type=int, default=4)
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--max-running", type=int, default=32)
    p.add_argument("--window-ms", type=float, default=10.0, help="the window batcher's gathering window")
    p.add_argument("--load", type=float, default=0.7, help="arrival rate as a fraction of the lower capacity")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = build_base(args)
    engine = Engine(base, max_batch=args.max_running)
    arts = adapters(base, engine, args)
    items = workload(args, base.shapes.vocab_size)
    schedulers = {"continuous": Scheduler(engine, max_running=args.max_running).start(),
                  "window": WindowScheduler(engine, args.window_ms / 1000, max_running=args.max_running).start()}
    try:
        capacity = {name: drive(s, items, arts, None) for name, s in schedulers.items()}
        rate = args.load * min(c["requests_per_s"] for c in capacity.values())
        rng = random.Random(args.seed + 1)
        gaps = [rng.expovariate(rate) for _ in items]
        loaded = {name: drive(s, items, arts, gaps) for name, s in schedulers.items()}
    finally:
        for s in schedulers.values():
            s.stop()
    same = loaded["continuous"]["_tokens"] == loaded["window"]["_tokens"] == capacity["continuous"]["_tokens"]
    for r in [*capacity.values(), *loaded.values()]:
        r.pop("_tokens")
    result = {
        "model": base.name, "device": str(base.device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "commit": _commit(), "requests": args.requests, "adapters": args.adapters, "load": args.load,
        "arrival_rate_per_s": round(rate, 3), "capacity": capacity, "open_loop": loaded,
        "p95_ttft_continuous_over_window": round(loaded["continuous"]["ttft_p95_s"] / loaded["window"]["ttft_p95_s"],
                                                 3),
        "same_tokens_in_every_run": same,
    }
    print("| scheduler | capacity req/s | offered req/s | achieved req/s | tok/s | TTFT p50 s | TTFT p95 s | "
          "latency p50 s | latency p95 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in schedulers:
        r = loaded[name]
        print(f"| {name} | {capacity[name]['requests_per_s']} | {rate:.2f} | {r['requests_per_s']} | "
              f"{r['tokens_per_s']} | {r['ttft_p50_s']} | {r['ttft_p95_s']} | {r['latency_p50_s']} | "
              f"{r['latency_p95_s']} |")
    print(f"\np95 TTFT continuous / window: {result['p95_ttft_continuous_over_window']}; same tokens in every run: "
          f"{same}")
    print(json.dumps(result))
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
