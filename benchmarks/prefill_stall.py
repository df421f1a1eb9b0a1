"""How long a long prompt's prefill stalls the rows already decoding: one-shot vs chunked prefill, side by side.

    python benchmarks/prefill_stall.py                      # CPU, embedded SmolLM2-135M, a 2,048-token arrival
    python benchmarks/prefill_stall.py --device cuda --model-shape llama-1b --dtype bfloat16 --long 8192

``--running`` requests (``--prompt`` tokens, many new tokens) decode on the continuous-batching scheduler; after they
have made ``--warm`` tokens each, one request with a ``--long``-token prompt arrives. Per ``--chunks`` setting of
``prefill_chunk`` (``0`` = one shot: the whole prompt in one forward, as without chunking) it reports the running
rows' longest gap between two tokens while the long prompt is prefilled (the stall), their median gap (a normal
step), and the long request's time to first token. Greedy tokens of every row are compared across settings (they
must not change).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from serve_throughput import _commit, add_model_args, build_base, write_result  # noqa: E402

from softprompts.model.generation import GenerationRequest  # noqa: E402
from softprompts.serve.engine import Engine  # noqa: E402
from softprompts.serve.scheduler import Scheduler  # noqa: E402


def measure(engine: Engine, chunk: int, prompts: list[list[int]], long_prompt: list[int], args) -> dict:
    scheduler = Scheduler(engine, max_running=args.running + 1, prefill_chunk=chunk or 10**9).start()
    stamps: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
    warmed = threading.Event()

    def on_token(tok, lp, i) -> None:
        stamps[i].append(time.perf_counter())
        if all(len(s) >= args.warm for s in stamps.values()):
            warmed.set()

    try:
        futures = [scheduler.submit(GenerationRequest(p, None, args.new, stop_ids=frozenset(),
                                                      on_token=lambda t, lp, i=i: on_token(t, lp, i)))
                   for i, p in enumerate(prompts)]
        warmed.wait()
        first: list[float] = []
        arrived = time.perf_counter()
        late = scheduler.submit(GenerationRequest(long_prompt, None, 4, stop_ids=frozenset(),
                                                  on_token=lambda t, lp: first.append(time.perf_counter())))
        late_tokens = late.result().tokens
        tokens = [f.result().tokens for f in futures]
    finally:
        scheduler.stop()
    gaps = [b - a for s in stamps.values() for a, b in zip(s, s[1:], strict=False)]
    during = [b - a for s in stamps.values() for a, b in zip(s, s[1:], strict=False) if b > arrived and a < first[0]]
    return {"prefill_chunk": chunk or "one shot", "stall_max_s": round(max(during, default=0.0), 3),
            "step_median_s": round(statistics.median(gaps), 3), "long_ttft_s": round(first[0] - arrived, 3),
            "_tokens": [*tokens, late_tokens]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--running", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=160, help="tokens each running request generates")
    p.add_argument("--warm", type=int, default=5, help="tokens each running row has made when the long one arrives")
    p.add_argument("--long", type=int, default=2048)
    p.add_argument("--chunks", default="0,512,256")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = build_base(args)
    gen = torch.Generator().manual_seed(0)
    vocab = base.shapes.vocab_size
    prompts = torch.randint(100, vocab - 100, (args.running, args.prompt), generator=gen).tolist()
    long_prompt = torch.randint(100, vocab - 100, (args.long,), generator=gen).tolist()
    engine = Engine(base, max_batch=args.running + 1)
    rows = [measure(engine, int(c), prompts, long_prompt, args) for c in args.chunks.split(",")]
    same = all(r["_tokens"] == rows[0]["_tokens"] for r in rows)
    for r in rows:
        r.pop("_tokens")
    result = {"model": base.name, "device": str(base.device), "threads": torch.get_num_threads(), "commit": _commit(),
              "running": args.running, "long_prompt": args.long, "rows": rows, "same_tokens": same}
    print("| prefill | running rows' longest gap s | their median step s | long prompt TTFT s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['prefill_chunk']} | {r['stall_max_s']} | {r['step_median_s']} | {r['long_ttft_s']} |")
    print(f"same tokens under every setting: {same}")
    print(json.dumps(result))
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
