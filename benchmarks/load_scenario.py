"""The serving load scenario: 1,000 requests with adapters added, replaced and deleted under load, and bad requests.

    python benchmarks/load_scenario.py                      # or: python benchmarks/load_test.py --scenario
    python benchmarks/load_scenario.py --requests 200 --concurrency 16 --json /tmp/load.json
    .venv-vllm/bin/python benchmarks/load_scenario.py --engine vllm         # the same on vLLM's engine (make vllm)
    .venv-vllm/bin/python benchmarks/load_scenario.py --engine vllm --kill-engine-at 0.5 --requests 200

1. Save ``--adapters`` adapters for the model (every kind in turn: prompt tuning, prefix tuning, P-tuning, deep
   prompts, perturbed so each answers differently) in a temporary directory and start ``softprompts serve
   [--engine vllm]`` on it (a subprocess on a free loopback port, ``--poll-seconds 0.5``).
2. References: every (model, prompt) pair sent ALONE, greedy, while the server is idle.
3. Load: ``--requests`` greedy completions from ``--concurrency`` threads, round-robin over the adapters and
   ``base``, 8 prompts with 4-32 new tokens, every 4th streamed. At 25 % of the requests an adapter is added (saved
   beside the others, atomically) and joins the rotation once ``/v1/models`` lists it; at 50 % one adapter's files
   are replaced (new values, same name); at 75 % one adapter's directory is removed. A side thread sends bad
   requests throughout (invalid JSON, an unknown field, a prompt over the context, an unknown model).
4. References again for the added and the replaced adapter (their new version).

Checks (the exit status is 1 when any fails): no valid request failed; every answer equals its reference (the
replaced adapter's: the old or the new version's); the deleted adapter answered 200 before its removal and 404
from ``2 x poll + 1 s`` after it; every bad request got its documented status; the server's RSS stops growing once
warm (from 25 % of the run to its end within 10 % + 50 MB of its value at 25 %; on vLLM the API server and its
engine processes together). Prints p50/p95 latency, requests/s, tokens/s.

On ``--engine vllm`` the bad requests are the ones that engine answers: besides the front's refusals, a client's
``kv_transfer_params`` (naming an adapter's own file) and ``prompt_embeds`` on the base model (400: only the front may
set them). ``--kill-engine-at F`` instead SIGKILLs vLLM's engine process once a fraction F of the requests has been
sent and reports what the clients got (statuses, by whether their request started before or after the kill) and how
``serve`` ended (its exit status and how long after the kill): what a supervisor sees.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import softprompts as sp  # noqa: E402

PROMPTS = [("Review: a gripping, beautiful film\nSentiment:", 4), ("Once upon a time", 32),
           ("The capital of France is", 8), ("def fibonacci(n):", 24), ("Translate to French: good morning", 12),
           ("Q: What is two plus two?\nA:", 6), ("The weather today", 16), ("Dear team,", 20)]
BAD_REQUESTS = [  # (body bytes or JSON, expected status)
    (b'{"model": "base", "prompt": ', 422),
    ({"model": "base", "prompt": "x", "tools": []}, 400),
    ({"model": "base", "prompt": "x " * 9000, "max_tokens": 4}, 400),
    ({"model": "no-such-adapter", "prompt": "x"}, 404),
]
VLLM_BAD_REQUESTS = [  # base bodies are vLLM's to judge, adapters' the front's; fields only the front sets: 400
    (b'{"model": "base", "prompt": ', 400),
    ({"model": "prefix-1", "prompt": "x", "tools": []}, 400),
    ({"model": "base", "prompt": "x " * 9000, "max_tokens": 4}, 400),
    ({"model": "no-such-adapter", "prompt": "x"}, 404),
    ({"model": "base", "prompt": [0] * 8 + [28, 29], "max_tokens": 2,
      "kv_transfer_params": {"softprompts_kv": "ADAPTERS/prefix-1/adapter.safetensors", "num_virtual_tokens": 8}}, 400),
    ({"model": "base", "prompt_embeds": "AAAA", "max_tokens": 2}, 400),
]
METHODS = ("prompt", "prefix", "ptuning", "deep")
POLL_S = 0.5
MAX_MODEL_LEN = 2048  # vLLM's context for the scenario (the longest request: 9,000 tokens, refused either way)


def make_adapter(base, directory: Path, method: str, seed: int) -> None:
    """A perturbed adapter saved atomically (written beside, then renamed into place by ``save_adapter``)."""
    m = sp.create_method(base, method, num_virtual_tokens=8, init="random" if method == "prefix" else "vocab",
                         seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5 * (p.float().std().item() or 1.0))
    sp.save_adapter(sp.Adapter.from_method(m, base, task={"task": "generate"}), directory, overwrite=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(adapters: Path, model: str, port: int, log: Path, engine: str = "softprompts") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "softprompts", "serve", "--adapters", str(adapters), "--model", model,
           "--port", str(port), "--poll-seconds", str(POLL_S), "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    if engine == "vllm":  # fp32 like the references; one thread each for the front's process and the engine's
        cmd += ["--engine", "vllm", "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0"]
        env = {**env, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start within 600 s")


def complete(client: httpx.Client, model: str, prompt: str, max_tokens: int, stream: bool) -> tuple[int, str, int]:
    """(status, text, generated tokens) of one greedy completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if not stream:
        r = client.post("/v1/completions", json=body)
        if r.status_code != 200:
            return r.status_code, r.text[:200], 0
        data = r.json()
        return 200, data["choices"][0]["text"], data["usage"]["completion_tokens"]
    text, events = [], 0
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode()[:200], 0
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    if not lines or lines[-1] != "data: [DONE]":
        return 599, f"stream did not end with [DONE]: {lines[-1:]}", 0
    for line in lines[:-1]:
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return 598, chunk["error"]["message"], 0
        text.append(chunk["choices"][0]["text"])
        events += 1
    return 200, "".join(text), events


def references(url: str, models: list[str]) -> dict[tuple[str, str], str]:
    with httpx.Client(base_url=url, timeout=120) as client:
        out = {}
        for model in models:
            for prompt, new in PROMPTS:
                status, text, _ = complete(client, model, prompt, new, False)
                if status != 200:
                    raise RuntimeError(f"reference {model!r} failed: {status} {text}")
                out[(model, prompt)] = text
        return out


def wait_listed(url: str, name: str, present: bool, timeout: float = 30.0) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
        if (name in ids) == present:
            return time.time()
        time.sleep(0.1)
    raise RuntimeError(f"{name!r} {'never appeared in' if present else 'never left'} /v1/models")


def run(args) -> dict:
    torch.manual_seed(0)
    base = sp.load_base(args.model)
    work = Path(tempfile.mkdtemp(prefix="sp-load-"))
    served, spare = work / "served", work / "spare"
    served.mkdir()
    names = [f"{METHODS[i % len(METHODS)]}-{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        make_adapter(base, served / name, name.split("-")[0], seed=i)
    added, replaced, deleted = "prompt-added", names[3], names[4]
    make_adapter(base, spare / added, "prompt", seed=1000)  # saved now, moved in under load
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(served, args.model, port, work / "server.log", args.engine)
    server = psutil.Process(proc.pid)
    rss: list[tuple[float, int]] = []
    bad = [(b.replace(b"ADAPTERS", str(served).encode()) if isinstance(b, bytes) else
            json.loads(json.dumps(b).replace("ADAPTERS", str(served))), want)
           for b, want in (VLLM_BAD_REQUESTS if args.engine == "vllm" else BAD_REQUESTS)]
    try:
        if args.kill_engine_at is not None:
            return _killed(args, url, names, proc, server, work)
        refs = references(url, ["base", *names])
        rss_start = _rss(server)
        results, stop = _load(args, url, names, added, replaced, deleted, base, served, spare, server, rss, bad)
        refs_new = references(url, [added, replaced])
        rss_end = _rss(server)
    finally:
        _stop(proc)
    return _report(args, results, stop, refs, refs_new, replaced, deleted, rss_start, rss_end, rss, work)


def _rss(server: psutil.Process) -> int:
    """The server's resident memory, its child processes' included (vLLM's engine runs in one)."""
    total = 0
    for proc in [server, *server.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _engine_process(server: psutil.Process) -> psutil.Process:
    """vLLM's engine core: the server's child process that runs the model."""
    children = server.children(recursive=True)
    named = [c for c in children if "EngineCore" in c.name() or "EngineCore" in " ".join(c.cmdline())]
    if not named:
        raise RuntimeError(f"no engine process among the server's children: {[c.name() for c in children]}")
    return named[0]


def _killed(args, url: str, names: list[str], proc: subprocess.Popen, server: psutil.Process, work: Path) -> dict:
    """SIGKILL vLLM's engine once ``kill_engine_at`` of the requests were sent; what clients and a supervisor see."""
    models = ["base", *names]
    lock, counter, results, killed = threading.Lock(), iter(range(args.requests)), [], {}
    engine = _engine_process(server)

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                if i == int(args.requests * args.kill_engine_at):
                    engine.kill()
                    killed["at"] = time.time()
                prompt, new = PROMPTS[i % len(PROMPTS)]
                started = time.time()
                try:
                    status, text, _ = complete(client, models[i % len(models)], prompt, new, i % 4 == 0)
                except httpx.HTTPError as exc:
                    status, text = 597, type(exc).__name__
                with lock:
                    results.append({"started": started, "status": status, "text": text[:120]})

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        code = proc.wait(timeout=120)
        exited = round(time.time() - killed["at"], 1)
    except subprocess.TimeoutExpired:
        code, exited = None, None
    at = killed.get("at", float("inf"))

    def tally(rows: list[dict]) -> dict:
        counts: dict[str, int] = {}
        for r in rows:
            counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
        return counts

    before = [r for r in results if r["started"] < at]
    after = [r for r in results if r["started"] >= at]
    return {"engine": "vllm", "requests": len(results),
            "killed_after_requests": int(args.requests * args.kill_engine_at),
            "statuses_started_before_kill": tally(before), "statuses_started_after_kill": tally(after),
            "error_samples": sorted({r["text"] for r in results if r["status"] != 200})[:4],
            "serve_exit_status": code, "serve_exited_s_after_kill": exited,
            "passed": code not in (None, 0), "work_dir": str(work)}


def _load(args, url, names, added, replaced, deleted, base, served, spare, server, rss, bad_bodies):
    models = ["base", *names]
    lock = threading.Lock()
    results: list[dict] = []
    events: dict[str, float] = {}
    counter = iter(range(args.requests))
    stop = threading.Event()

    def mutate(i: int) -> None:
        if i == args.requests // 4:
            os.rename(spare / added, served / added)  # atomic: the directory appears complete
            events["added"] = wait_listed(url, added, True)
            with lock:
                models.append(added)
        elif i == args.requests // 2:
            events["replace_start"] = time.time()
            make_adapter(base, served / replaced, replaced.split("-")[0], seed=2000)  # same name, new values
            events["replaced"] = time.time()
        elif i == 3 * args.requests // 4:
            events["deleted"] = time.time()
            shutil.rmtree(served / deleted)

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=args.max_seconds) as client:
            while not stop.is_set():
                with lock:
                    i = next(counter, None)
                    model = models[i % len(models)] if i is not None else None
                if i is None:
                    return
                if i in (args.requests // 4, args.requests // 2, 3 * args.requests // 4):
                    threading.Thread(target=mutate, args=(i,)).start()  # beside the load, not blocking this worker
                prompt, new = PROMPTS[(i // len(models)) % len(PROMPTS)]
                started = time.time()
                try:
                    status, text, tokens = complete(client, model, prompt, new, i % 4 == 0)
                except httpx.HTTPError as exc:
                    status, text, tokens = 597, f"{type(exc).__name__}: {exc}", 0
                with lock:
                    results.append({"i": i, "model": model, "prompt": prompt, "status": status, "text": text,
                                    "tokens": tokens, "started": started, "latency": time.time() - started,
                                    "stream": i % 4 == 0})

    def bad_requests() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            k = 0
            while not stop.is_set():
                body, want = bad_bodies[k % len(bad_bodies)]
                kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                    else {"json": body}
                r = client.post("/v1/completions", **kw)
                with lock:
                    results.append({"bad": True, "status": r.status_code, "want": want, "text": r.text[:200]})
                k += 1
                stop.wait(0.2)

    def sample_rss() -> None:
        while not stop.is_set():
            rss.append((time.time(), _rss(server)))
            stop.wait(0.25)

    side = [threading.Thread(target=bad_requests), threading.Thread(target=sample_rss)]
    workers = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    started = time.time()
    for t in side + workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    for t in side:
        t.join()
    return results, {"wall_s": time.time() - started, **events}


def _report(args, results, events, refs, refs_new, replaced, deleted, rss_start, rss_end, rss, work) -> dict:
    valid = [r for r in results if not r.get("bad")]
    bad = [r for r in results if r.get("bad")]
    failures, mismatches, deleted_wrong = [], [], []
    deleted_at = events.get("deleted", float("inf"))
    seen_by = deleted_at + 2 * POLL_S + 1.0
    for r in valid:
        if r["model"] == deleted and r["started"] >= deleted_at:
            if r["started"] >= seen_by and r["status"] != 404:
                deleted_wrong.append(r)
            if r["status"] in (200, 404):
                continue
        if r["status"] != 200:
            failures.append(r)
            continue
        key = (r["model"], r["prompt"])
        allowed = {refs.get(key, refs_new.get(key))}
        if r["model"] == replaced and r["started"] >= events["replace_start"]:  # old or new until the poll saw it
            seen = r["started"] >= events["replaced"] + 2 * POLL_S + 1
            allowed = {refs_new[key]} if seen else {refs[key], refs_new[key]}
        if r["text"] not in allowed:
            mismatches.append({**r, "expected": sorted(allowed)})
    before_delete = [r for r in valid if r["model"] == deleted and r["started"] < deleted_at - 1]
    bad_wrong = [r for r in bad if r["status"] != r["want"]]
    latencies = sorted(r["latency"] for r in valid if r["status"] == 200)
    tokens = sum(r["tokens"] for r in valid if r["status"] == 200)
    peak = max((v for _, v in rss), default=rss_end)
    # bounded = no growth once warm: the first quarter fills the batch's KV buffers and the allocator's pools; after
    # it the RSS must stay within 10 % (+ 50 MB) of where it stood at 25 % of the run
    warm = rss[len(rss) // 4][1] if rss else rss_start
    rss_ok = max((v for _, v in rss[len(rss) // 4 :]), default=rss_end) <= warm * 1.10 + 50 * 2**20
    report = {
        "engine": args.engine, "requests": len(valid), "concurrency": args.concurrency,
        "adapters": args.adapters + 1,
        "failed_valid_requests": len(failures), "failure_samples": [_short(r) for r in failures[:5]],
        "greedy_answers_checked": len(valid) - len(failures),
        "greedy_mismatches": len(mismatches), "mismatch_samples": [_short(r) for r in mismatches[:3]],
        "deleted_adapter_requests": {"before": len(before_delete),
                                     "before_ok": sum(r["status"] == 200 for r in before_delete),
                                     "after_seen": sum(r["started"] >= seen_by for r in valid if r["model"] == deleted),
                                     "after_seen_not_404": len(deleted_wrong)},
        "bad_requests": len(bad), "bad_requests_wrong_status": len(bad_wrong),
        "bad_samples": [_short(r) for r in bad_wrong[:3]],
        "rss_mb": {"after_references": round(rss_start / 2**20), "peak": round(peak / 2**20),
                   "end": round(rss_end / 2**20), "bounded": rss_ok,
                   "at_0_25_50_75_100_percent_of_the_run": [round(rss[min(len(rss) - 1, q * len(rss) // 4)][1] / 2**20)
                                                            for q in range(5)] if rss else []},
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
        "wall_s": round(events["wall_s"], 1),
        "requests_per_s": round(len(valid) / events["wall_s"], 2),
        "tokens_per_s": round(tokens / events["wall_s"], 1),
        "work_dir": str(work),
    }
    report["passed"] = (not failures and not mismatches and not deleted_wrong and not bad_wrong and rss_ok
                        and report["deleted_adapter_requests"]["before_ok"] == len(before_delete) > 0)
    return report


def _short(r: dict) -> dict:
    return {k: v for k, v in r.items() if k in ("i", "model", "status", "want", "text", "expected", "stream")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=600.0, help="per-request client timeout")
    p.add_argument("--json", default=None)
    p.add_argument("--engine", choices=("softprompts", "vllm"), default="softprompts",
                   help="the engine serve runs (vllm: run this script with .venv-vllm/bin/python)")
    p.add_argument("--kill-engine-at", type=float, default=None, metavar="F",
                   help="--engine vllm: SIGKILL vLLM's engine process after a fraction F of the requests")
    args = p.parse_args(argv)
    report = run(args)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
