"""A real HTTP server (uvicorn on 127.0.0.1, a free port, in a thread) over >= 8 adapters of the four methods."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import httpx
import pytest
from live_server import live_server
from tiny import concurrently, decode_alone, perturbed, save_tiny, tiny_base

import softprompts as sp
from softprompts.model.generation import GenerationRequest
from softprompts.serve.http import build_state

METHODS = ["prompt", "ptuning", "prefix", "deep"]
CLASSIFY = {"task": "classify", "prompt": "Review: {text}\nSentiment:", "target": " {label}",
            "labels": ["positive", "negative"]}
ROOT = Path(__file__).resolve().parents[1]


def save(base, directory, method, n, seed, task=None):
    m = perturbed(base, method, n, "virtual tokens"[:n], scale=0.2, seed=seed)
    return sp.save_adapter(sp.Adapter.from_method(m, base, task=task), directory, overwrite=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tiny_base("llama")
    root = tmp_path_factory.mktemp("adapters")
    for i in range(8):
        save(base, root / f"{METHODS[i % 4]}-{i}", METHODS[i % 4], n=2 + i, seed=i)
    save(base, root / "sentiment", "prompt", n=4, seed=99, task=CLASSIFY)
    state = build_state(base, root, max_running=16, poll_s=0.2)
    with live_server(state) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, state, root


def expected_text(state, name, prompt, max_tokens):
    """What the engine alone produces for one greedy request (the reference for every HTTP answer)."""
    artifact = None if name == "base" else state.registry.get(name).artifact
    ids = state.base.tokenize(prompt)
    result = decode_alone(state.engine, [GenerationRequest(ids, artifact, max_tokens)])[0]
    return state.base.tokenizer.decode(result.tokens, skip_special_tokens=True)


def complete(client, **body):
    body = {"max_tokens": 5, "temperature": 0, **body}
    return client.post("/v1/completions", json=body)


def test_health_and_adapter_list(server):
    client, _, _ = server
    assert client.get("/health").json()["status"] == "ok"
    data = client.get("/v1/adapters").json()["data"]
    assert len(data) >= 9 and {d["method"] for d in data} == set(METHODS)


def test_concurrent_clients_over_eight_adapters_match_engine(server):
    client, state, _ = server
    names = [f"{METHODS[i % 4]}-{i}" for i in range(8)] + ["base"]

    def call(name):
        with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
            return complete(c, model=name, prompt=f"hi {name}")

    answers = concurrently([partial(call, n) for n in names])
    texts = set()
    for name, r in zip(names, answers, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == name
        assert body["choices"][0]["text"] == expected_text(state, name, f"hi {name}", 5)
        assert body["usage"]["prompt_tokens"] == len(f"hi {name}")
        texts.add(body["choices"][0]["text"])
    assert len(texts) > 1
    assert "softprompts_batch_size_bucket" in client.get("/metrics").text


def test_multiple_prompts_stop_and_sampling(server):
    client, state, _ = server
    full = complete(client, model="prefix-2", prompt=["one", "two"], max_tokens=6).json()
    assert [c["index"] for c in full["choices"]] == [0, 1]
    text = full["choices"][0]["text"]
    # a stop string that first occurs after the start of the greedy text: the answer must end right before it
    firsts = [ch for i, ch in enumerate(text) if i > 0 and ch.strip() and ch != "\ufffd" and text.find(ch) == i]
    assert firsts, f"the greedy text {text!r} has no usable stop character; pick another prompt"
    stop = firsts[0]
    cut = complete(client, model="prefix-2", prompt="one", max_tokens=6, stop=[stop]).json()["choices"][0]
    assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
    seeded = {"model": "deep-3", "prompt": "x", "temperature": 0.8, "top_k": 10, "top_p": 0.9, "seed": 5}
    a, b = complete(client, **seeded).json(), complete(client, **seeded).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_streaming_equals_plain(server):
    client, _, _ = server
    plain = complete(client, model="ptuning-1", prompt="stream me", max_tokens=8).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={"model": "ptuning-1", "prompt": "stream me",
                                                          "max_tokens": 8, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == plain["text"]
    assert len(chunks) >= 2 and chunks[-1]["finish_reason"] == plain["finish_reason"]


def test_classify(server):
    client, state, _ = server
    r = client.post("/v1/classify", json={"model": "sentiment", "texts": ["great film", "awful plot"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == CLASSIFY["labels"]
    for res in body["results"]:
        assert res["label"] in CLASSIFY["labels"] and sum(res["scores"].values()) == pytest.approx(1.0)
        assert res["label"] == max(res["logprobs"], key=res["logprobs"].get)
    assert client.post("/v1/classify", json={"model": "prefix-2", "texts": ["x"]}).status_code == 400


def test_hot_load_change_delete_and_reload(server):
    client, state, root = server
    base = state.base
    save(base, root / "fresh", "deep", n=3, seed=42)
    deadline = time.time() + 20
    while time.time() < deadline and "fresh" not in {d["id"] for d in client.get("/v1/adapters").json()["data"]}:
        time.sleep(0.1)
    assert complete(client, model="fresh", prompt="new").status_code == 200
    # change an adapter while requests to it are in flight: none is dropped, the new version is served after
    def call():
        with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
            return complete(c, model="prompt-0", prompt="during reload", max_tokens=12).status_code

    def reload():
        save(base, root / "prompt-0", "prefix", n=7, seed=7)
        assert client.post("/v1/adapters/prompt-0/load").json()["num_virtual_tokens"] == 7

    assert concurrently([call] * 4, while_running=reload) == [200] * 4
    assert client.delete("/v1/adapters/fresh").status_code == 200
    assert complete(client, model="fresh", prompt="gone").status_code == 404
    assert client.post("/v1/adapters/fresh/load").status_code == 200
    assert complete(client, model="fresh", prompt="back").status_code == 200


def test_bad_inputs_answer_and_server_stays_up(server):
    client, state, _ = server
    r = complete(client, model="no-such-adapter", prompt="x")
    assert r.status_code == 404 and "no-such-adapter" in r.json()["error"]["message"]
    assert client.delete("/v1/adapters/no-such-adapter").status_code == 404
    assert client.post("/v1/adapters/no-such-adapter/load").status_code == 404
    bad = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 422
    r = client.post("/v1/completions", json={"model": "base"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt"
    for field, value in [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("top_k", -2), ("max_tokens", 0),
                         ("seed", -1), ("n", 17), ("logprobs", 21), ("stream", "maybe")]:
        r = complete(client, model="base", prompt="x", **{field: value})
        assert r.status_code == 422, (field, r.text)
        assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]
    r = complete(client, model="base", prompt="y" * 300)
    assert r.status_code == 400 and "256" in r.json()["error"]["message"]
    r = complete(client, model="prefix-2", prompt="y" * 240, max_tokens=20)
    assert r.status_code == 400 and "context limit is 256" in r.json()["error"]["message"]
    for name in ["../prefix-2", "a/../b", "..\\x"]:
        assert complete(client, model=name, prompt="x").status_code == 400
    assert client.post("/v1/adapters/%2E%2E/load").status_code in (400, 404)
    assert client.post("/v1/classify", json={"model": "sentiment", "texts": []}).status_code == 422
    assert client.get("/health").json()["status"] == "ok"
    ok = complete(client, model="deep-7", prompt="still fine")
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == expected_text(state, "deep-7", "still fine", 5)
    metrics = client.get("/metrics").text
    for name in ["softprompts_requests_total", "softprompts_generated_tokens_total",
                 "softprompts_request_latency_seconds_bucket", "softprompts_batch_size_count"]:
        assert name in metrics
    assert 'status="404"' in metrics and 'status="422"' in metrics


@pytest.mark.slow  # the benchmark as a subprocess
def test_bounded_load_script_reports_no_errors(server):
    """``benchmarks/load_test.py`` run as its users run it (a script: the tests never import from ``benchmarks/``)."""
    client, _, _ = server
    script = [sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--requests", "24", "--concurrency", "6",
              "--max-seconds", "60", "--max-tokens", "4"]
    run = subprocess.run([*script, "--url", str(client.base_url)], capture_output=True, text=True, timeout=120)
    report = json.loads(run.stdout)
    assert run.returncode == 0 and report["errors"] == 0, report["error_samples"]
    assert report["requests"] == 24 and report["latency_p95_s"] > 0
    refused = subprocess.run([*script, "--url", "http://example.com:8000"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "loopback" in refused.stderr


def test_cli_serve_in_process(tmp_path, monkeypatch, capsys):
    """In-process twin of ``test_cli_serve_subprocess`` (test-fast): ``softprompts serve`` loads the model and the
    adapter directory and hands uvicorn an app (caught here instead of listening) that answers a completion."""
    import uvicorn
    from fastapi.testclient import TestClient

    from softprompts.cli import main

    model = save_tiny("gpt2", tmp_path / "model")
    save(sp.load_base(str(model)), tmp_path / "adapters" / "p", "prefix", n=3, seed=1)
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert main(["serve", "--adapters", str(tmp_path / "adapters"), "--model", str(model), "--port", "8123",
                 "--log-level", "warning"]) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8123 and served["log_level"] == "warning"
    assert "with 1 adapters (p) on http://127.0.0.1:8123" in capsys.readouterr().out
    with TestClient(served["app"]) as client:
        r = client.post("/v1/completions", json={"model": "p", "prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.slow  # a server subprocess; test_cli_serve_in_process builds the same app in this process
def test_cli_serve_subprocess(tmp_path):
    model = save_tiny("gpt2", tmp_path / "model")
    base = sp.load_base(str(model))
    save(base, tmp_path / "adapters" / "p", "prefix", n=3, seed=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "softprompts", "serve", "--adapters", str(tmp_path / "adapters"), "--model", str(model),
         "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
            assert proc.poll() is None, proc.stdout.read()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": "p", "prompt": "hi", "max_tokens": 3, "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    bad = subprocess.run([sys.executable, "-m", "softprompts", "serve", "--adapters", str(tmp_path / "missing"),
                          "--model", str(model)], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
