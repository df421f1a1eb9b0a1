"""The same requests on both engines: ``softprompts serve`` (ours) and ``softprompts serve --engine vllm`` (vLLM's
engine behind the adapters' front), side by side in one run.

    .venv-vllm/bin/python benchmarks/vs_vllm.py                       # make vllm first; ~15 min on 2 cores
    .venv-vllm/bin/python benchmarks/vs_vllm.py --repeats 1 --concurrency 1 8 --out vs_vllm.json

Workloads: ``base`` (the model alone) and ``mixed`` (16 adapters: 8 soft prompts, 8 KV prefixes - prefix tuning and
deep prompts - chosen round-robin), each at concurrency 1, 8 and 32. Every request is streamed, greedy, with a
~60-token prompt (distinct per request, so no prefix is shared between requests except an adapter's own) and
``--max-tokens`` new tokens (ignore_eos, so every request generates exactly that many).

Both servers start once at the same ``--dtype`` (default float32; ``auto`` resolves the same on both: bfloat16 on a
CPU with AVX512-BF16 / AMX, ``model/load.auto_dtype``) with their defaults (ours 32 running requests, vLLM
``--max-num-seqs 32``) and stay up;
the cells run one at a time, interleaved (for each repeat, concurrency and workload: one engine then the other, the
order alternating between repeats), so a drift of the machine falls on both. An idle server's CPU time is sampled
before the runs and printed: it must be near 0 for the interleaving to be fair. Per cell: generated tokens/s over the
cell's wall time, time to first token (mean, and p95) and request latency p50 / p95; then the ratios ours / vLLM
(throughput: >= 1 means ours is faster; TTFT and p95: <= 1 means ours is faster). One JSON object is printed (and
written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

import softprompts as sp

WORDS = ("river stone light garden market winter story number music window yellow quiet table mountain paper "
         "letter summer animal people country").split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(base, directory: Path, count: int = 16) -> list[str]:
    """``count`` adapters: half soft prompts (P=16), half KV prefixes (prefix tuning and deep prompts, P=16)."""
    methods = ["prompt", "prefix", "prompt", "deep"]
    names = []
    for i in range(count):
        method = methods[i % len(methods)]
        made = sp.create_method(base, method, num_virtual_tokens=16, init_text=f"Task {i}: answer about {WORDS[i]}.")
        sp.save_adapter(sp.Adapter.from_method(made, base), directory / f"{method}-{i}", overwrite=True)
        names.append(f"{method}-{i}")
    return names


def prompt_text(i: int) -> str:
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(40)]
    return f"Request {i}. " + " ".join(words) + "\nSummary:"


class Server:
    """A ``softprompts serve`` subprocess (``engine``), its port, log and CPU time."""

    def __init__(self, engine: str, adapters: Path, log_dir: Path, extra: list[str], dtype: str = "float32") -> None:
        self.engine, self.port = engine, _free_port()
        self.log = (log_dir / f"{engine}.log").open("w")
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 2)}
        command = [sys.executable, "-m", "softprompts", "serve", "--adapters", str(adapters), "--port", str(self.port),
                   "--poll-seconds", "0", "--log-level", "warning", "--dtype", dtype]
        if engine == "vllm":
            command = [*command[:4], "--engine", "vllm", *command[4:], "--max-num-seqs", "32", *extra]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout_s: float = 600) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.engine} server exited; see {self.log.name}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise RuntimeError(f"the {self.engine} server did not start in {timeout_s} s; see {self.log.name}")

    def cpu_seconds(self) -> float:
        """CPU time of the server's whole process group (vLLM runs its engine in a child process)."""
        import psutil

        total = 0.0
        parent = psutil.Process(self.process.pid)
        for process in [parent, *parent.children(recursive=True)]:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def one_request(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """``(time to first token, latency, tokens)`` of one streamed greedy completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with client.stream("POST", "/v1/completions", json=body) as answer:
        if answer.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {answer.status_code}: {answer.read()[:300]!r}")
        for line in answer.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and any(c.get("text") for c in event.get("choices", [])):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if tokens != max_tokens:
        raise RuntimeError(f"{model}: {tokens} tokens generated, {max_tokens} asked (ignore_eos)")
    return first or 0.0, time.perf_counter() - start, tokens


def run_cell(url: str, models: list[str], concurrency: int, requests: int, max_tokens: int, offset: int) -> dict:
    """``requests`` streamed completions over ``models`` (round-robin), ``concurrency`` in flight."""
    results: list[tuple[float, float, int]] = []
    lock, counter = threading.Lock(), iter(range(requests))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            for i in counter:
                got = one_request(client, models[i % len(models)], prompt_text(offset + i), max_tokens)
                with lock:
                    results.append(got)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if len(results) != requests:
        raise RuntimeError(f"{requests - len(results)} of {requests} requests failed (see the server logs)")
    ttft, latency = sorted(r[0] for r in results), sorted(r[1] for r in results)

    def p95(values: list[float]) -> float:
        return values[min(len(values) - 1, int(0.95 * len(values)))]

    return {"tokens_per_s": sum(r[2] for r in results) / wall, "ttft_mean_s": statistics.mean(ttft),
            "ttft_p95_s": p95(ttft), "latency_p50_s": statistics.median(latency), "latency_p95_s": p95(latency),
            "wall_s": wall, "requests": requests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests-per-slot", type=int, default=2, help="requests per cell = max(16, this x "
                        "concurrency)")
    parser.add_argument("--vllm-arg", action="append", default=[], help="an extra option for vLLM (repeatable)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                        help="both engines' dtype (compare engines only at the same dtype)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="vs-vllm-"))
    base = sp.load_base(dtype="float32")
    adapters = make_adapters(base, work / "adapters")
    del base
    workloads = {"base": ["base"], "mixed": adapters}
    servers = {"ours": Server("softprompts", work / "adapters", work, [], args.dtype),
               "vllm": Server("vllm", work / "adapters", work, args.vllm_arg, args.dtype)}
    cells = []
    try:
        for server in servers.values():
            server.wait()
        for server in servers.values():  # warm up: every adapter once
            run_cell(server.url, adapters + ["base"], 4, len(adapters) + 1, 4, offset=10_000)
        idle = {name: s.cpu_seconds() for name, s in servers.items()}
        time.sleep(10)
        idle = {name: round((s.cpu_seconds() - idle[name]) / 10, 3) for name, s in servers.items()}
        print(f"idle CPU seconds per second: {idle}", flush=True)
        offset = 0
        for repeat in range(args.repeats):
            for concurrency in args.concurrency:
                for workload, models in workloads.items():
                    order = ["ours", "vllm"] if repeat % 2 == 0 else ["vllm", "ours"]
                    requests = max(16, args.requests_per_slot * concurrency)
                    for engine in order:  # the same requests (same offset) on both engines
                        cell = run_cell(servers[engine].url, models, concurrency, requests, args.max_tokens, offset)
                        cell.update(engine=engine, workload=workload, concurrency=concurrency, repeat=repeat)
                        cells.append(cell)
                        print(json.dumps(cell), flush=True)
                    offset += requests
    finally:
        for server in servers.values():
            server.stop()

    summary = []
    for concurrency in args.concurrency:
        for workload in workloads:
            def mean(engine: str, key: str, c=concurrency, w=workload) -> float:
                return statistics.mean(x[key] for x in cells if x["engine"] == engine and x["workload"] == w
                                       and x["concurrency"] == c)
            row = {"workload": workload, "concurrency": concurrency}
            for key in ("tokens_per_s", "ttft_mean_s", "latency_p95_s"):
                row[f"ours_{key}"], row[f"vllm_{key}"] = round(mean("ours", key), 4), round(mean("vllm", key), 4)
                row[f"ratio_{key}"] = round(mean("ours", key) / mean("vllm", key), 3)
            summary.append(row)
    result = {"machine": f"{os.cpu_count()} cores", "dtype": args.dtype, "max_tokens": args.max_tokens,
              "repeats": args.repeats, "idle_cpu": idle, "summary": summary, "cells": cells}
    print(json.dumps({"summary": summary, "idle_cpu": idle}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
