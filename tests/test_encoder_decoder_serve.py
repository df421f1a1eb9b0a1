"""Serving encoder-decoder bases (tiny T5 and BART): rows that join and leave the running batch between steps equal
each request alone (greedy and seeded), cancellation frees the row, and the HTTP server answers completions and
classification for a mix of seq2seq adapters and ``base`` exactly as the engine does alone."""

from __future__ import annotations

import threading
import time
from functools import partial

import httpx
import pytest
import torch
from live_server import live_server
from test_scheduler import decode_with_arrivals, staggered_requests
from tiny import cached_base, concurrently, decode_alone, perturbed

import softprompts as sp
import softprompts.data.datasets
import softprompts.evaluate
from softprompts.model.encoder_decoder.batch import EncoderDecoderBatch
from softprompts.model.generation import GenerationRequest
from softprompts.serve import Engine, Scheduler, ScoreRequest
from softprompts.serve.http import build_state

pytestmark = pytest.mark.injection

CLASSIFY = {"task": "classify", "prompt": "Review: {text}", "target": "{label}", "labels": ["pos", "neg"]}
MADE = [("prompt", 3), ("prefix", 4), ("ptuning", 3), ("deep", 2), ("prefix", 2)]  # two lengths of prefix


@pytest.fixture(params=["t5", "bart"])
def base(request):
    return cached_base(request.param)


def adapters(base) -> list:
    """Materialized artifacts of every method (``MADE``)."""
    return [perturbed(base, m, n, "task", seed=n).materialize() for m, n in MADE]


def staggered(base, arts, sampled: bool) -> list[GenerationRequest]:
    return staggered_requests(base, arts, sampled, rows=[None, *arts, arts[1]])


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_rows_joining_and_leaving_equal_alone(base, sampled):
    engine = Engine(base)
    reqs = staggered(base, [engine.prepare(a) for a in adapters(base)], sampled)
    done = {}
    batch = EncoderDecoderBatch(base, engine.eos_ids, on_finish=lambda r, res: done.__setitem__(id(r), res))
    sizes = decode_with_arrivals(batch, {0: reqs[:2], 1: [reqs[2]], 2: reqs[3:5], 4: [reqs[5]], 7: [reqs[6]]})
    assert max(sizes) >= 3 and len(done) == len(reqs)
    for req in reqs:
        want, got = decode_alone(engine, [req])[0], done[id(req)]
        assert got.tokens == want.tokens and len(got.tokens) == req.max_new_tokens
        for a, b in zip(got.logits, want.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_scheduler_serves_and_cancels(base):
    sched = Scheduler(Engine(base), max_running=16).start()
    try:
        arts = [sched.engine.prepare(a) for a in adapters(base)]
        reqs = staggered(base, arts, sampled=True)
        futures = [sched.submit(r) for r in reqs]
        for r, f in zip(reqs, futures, strict=True):
            assert f.result(timeout=60).tokens == decode_alone(sched.engine, [r])[0].tokens
        seen = threading.Event()
        endless = GenerationRequest(base.tokenize("abc"), arts[1], max_new_tokens=200, stop_ids=frozenset(),
                                    on_token=lambda tok, lp: seen.set())
        f_endless = sched.submit(endless)
        assert seen.wait(30)
        sched.cancel(f_endless)
        score = sched.submit(ScoreRequest(base.tokenize("a"), [base.tokenize("b"), base.tokenize("cd")], arts[0]))
        got = score.result(timeout=30)
        want = sp.evaluate.target_logprobs(base, arts[0], [base.tokenize("a")] * 2,
                                           [base.tokenize("b"), base.tokenize("cd")])
        assert got == pytest.approx([w[0] for w in want], abs=1e-4)
        assert f_endless.cancelled()
        deadline = time.time() + 10
        while sched.running and time.time() < deadline:
            time.sleep(0.01)
        assert sched.running == 0 and sched.admission.reserved == 0  # the cancelled row left and released its KV
    finally:
        sched.stop()


def test_http_completions_classify_and_refusals(base, tmp_path):
    for i, (method, n) in enumerate(MADE[:3]):  # prompt, prefix, ptuning
        module = perturbed(base, method, n, "task", seed=n)
        sp.save_adapter(sp.Adapter.from_method(module, base, task=CLASSIFY if i == 0 else None), tmp_path / method)
    state = build_state(base, tmp_path, max_running=8, poll_s=0)
    with live_server(state) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        names = ["prompt", "prefix", "ptuning", "base"]
        answers = concurrently([partial(client.post, "/v1/completions", json={
            "model": name, "prompt": f"hi {name}", "max_tokens": 5, "temperature": 0}) for name in names])
        for name, answer in zip(names, answers, strict=True):
            artifact = None if name == "base" else state.registry.get(name).artifact
            alone = decode_alone(state.engine, [GenerationRequest(base.tokenize(f"hi {name}"), artifact, 5)])[0]
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["text"] == base.tokenizer.decode(alone.tokens, skip_special_tokens=True)
        texts = ["good stuff", "bad stuff"]
        got = client.post("/v1/classify", json={"model": "prompt", "texts": texts})
        assert got.status_code == 200, got.text
        adapter = sp.load_adapter(tmp_path / "prompt", base)
        spec = sp.TaskSpec.from_json(CLASSIFY)
        examples = [sp.data.datasets.Example(prompt=f"Review: {t}", target="", label=None) for t in texts]
        assert [r["label"] for r in got.json()["results"]] == sp.evaluate.classify(base, adapter, examples, spec)
        echo = client.post("/v1/completions", json={"model": "base", "prompt": "abc", "max_tokens": 0, "echo": True,
                                                    "logprobs": 1})
        assert echo.status_code == 400 and "encoder-decoder" in echo.text
