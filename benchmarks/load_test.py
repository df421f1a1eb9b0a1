"""Bounded loopback load test for ``softprompts serve``: N completion requests over the served adapters.

    python benchmarks/load_test.py --url http://127.0.0.1:8000 --requests 64 --concurrency 8 --max-seconds 60
    python benchmarks/load_test.py --scenario            # the full scenario below, on a server it starts itself

Loopback only (refuses any other host), a fixed request count and a wall-clock bound. Prints one JSON object:
requests, errors (must be 0), error samples, latency p50/p95/max, requests/s and generated tokens/s; exits 1 when
any request failed.

``--scenario`` (``load_scenario.py``): 16 adapters (8 soft prompts, 8 KV prefixes) and ``base`` served by a
``softprompts serve`` subprocess; 1,000 greedy requests at concurrency 32, mixed completion lengths, every 4th
streamed; while they run an adapter is added, one's files replaced and one deleted, and bad requests are sent.
It checks: no error on a valid request, every greedy answer equal to that request sent alone, the deleted adapter
answering 404 once its deletion is seen (and 200 before), every bad request its documented status, and the
server's RSS bounded; it prints p50/p95 latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def run_load(
    url: str,
    requests: int = 32,
    concurrency: int = 4,
    max_seconds: float = 60.0,
    models: list[str] | None = None,
    max_tokens: int = 8,
    stream_every: int = 4,
) -> dict:
    """Send ``requests`` completions (round-robin over ``models``, every ``stream_every``-th one streamed)."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"load tests run against loopback only (127.0.0.1, localhost, ::1), not {host!r}")
    with httpx.Client(base_url=url, timeout=max_seconds) as client:
        if not models:
            listed = client.get("/v1/adapters").json()["data"]
            models = [m["id"] for m in listed if m.get("error") is None] or ["base"]
    deadline = time.perf_counter() + max_seconds
    latencies: list[float] = []
    errors: list[str] = []
    tokens = [0]
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=max_seconds) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"model": models[i % len(models)], "prompt": f"Request {i}: tell me", "max_tokens": max_tokens,
                        "temperature": 0.7, "seed": i, "stream": bool(stream_every) and i % stream_every == 0}
                started = time.perf_counter()
                try:
                    if body["stream"]:
                        with client.stream("POST", "/v1/completions", json=body) as r:
                            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                            ok = r.status_code == 200 and lines and lines[-1] == "data: [DONE]"
                            detail = f"stream status {r.status_code}, last event {lines[-1:]}"
                            used = max(len(lines) - 2, 0)
                    else:
                        r = client.post("/v1/completions", json=body)
                        ok = r.status_code == 200
                        detail = f"status {r.status_code}: {r.text[:200]}"
                        used = r.json()["usage"]["completion_tokens"] if ok else 0
                except httpx.HTTPError as exc:
                    ok, detail, used = False, f"{type(exc).__name__}: {exc}", 0
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    tokens[0] += used
                    if not ok:
                        errors.append(detail)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    done = len(latencies)
    ordered = sorted(latencies) or [0.0]
    return {
        "url": url,
        "requests": done,
        "requested": requests,
        "unsent": requests - done,
        "errors": len(errors) + (requests - done),
        "error_samples": errors[:5],
        "concurrency": concurrency,
        "adapters": len(models),
        "wall_s": round(wall, 3),
        "requests_per_s": round(done / wall, 2) if wall else 0.0,
        "tokens_per_s": round(tokens[0] / wall, 1) if wall else 0.0,
        "latency_p50_s": round(statistics.median(ordered), 4),
        "latency_p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 4),
        "latency_max_s": round(ordered[-1], 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--models", default="", help="comma-separated adapter names (default: every served adapter)")
    p.add_argument("--scenario", action="store_true", help="the full scenario on a server this script starts "
                   "(load_scenario.py and its flags: --requests defaults to 1,000 and --concurrency to 32 there)")
    argv = sys.argv[1:] if argv is None else argv
    if "--scenario" in argv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from load_scenario import main as scenario

        return scenario([a for a in argv if a != "--scenario"])
    args = p.parse_args(argv)
    report = run_load(args.url, args.requests, args.concurrency, args.max_seconds,
                      [m for m in args.models.split(",") if m] or None, args.max_tokens)
    print(json.dumps(report, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
