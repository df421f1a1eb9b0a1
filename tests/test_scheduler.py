"""Continuous batching: rows join and leave a running batch between steps, and every row still gets exactly the tokens
it gets alone (greedy and seeded sampling); admission control, cancellation and deadlines on the scheduler."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_engine import artifacts
from tiny import concurrently, decode_alone, tiny_base
from window_scheduler import WindowScheduler

from softprompts.model.decode_loop import decode_batch
from softprompts.model.decoder.chunked_prefill import ChunkedPrefill
from softprompts.model.decoder.decode import DecodeBatch
from softprompts.model.generation import GenerationRequest, Sampling
from softprompts.serve import Engine, Overloaded, Scheduler, ScoreRequest
from softprompts.serve.admission import kv_bytes_per_token

PROMPTS = ["abc", "hello there", "x", "some longer prompt", "qq", "zz top", "a much longer prompt than the rest"]


def staggered_requests(base, arts, sampling: bool = False, rows=None) -> list[GenerationRequest]:
    """Rows of different adapters (``rows``, one per prompt of ``PROMPTS``; default: none, each of ``arts``, the first
    and third again), prompt lengths and lengths to generate (so rows leave at different steps); seeded sampling or
    greedy."""
    rows = [None, *arts, arts[0], arts[2]] if rows is None else rows
    out = []
    for i, (prompt, art) in enumerate(zip(PROMPTS, rows, strict=True)):
        kw = {"sampling": Sampling(0.9, 20, 0.9, seed=100 + i)} if sampling else {}
        out.append(GenerationRequest(base.tokenize(prompt), art, max_new_tokens=2 + (5 * i) % 9,
                                     stop_ids=frozenset(), collect_logits=True, **kw))
    return out


def decode_with_arrivals(batch, arrivals: dict[int, list[GenerationRequest]]) -> list[int]:
    """Step ``batch`` to the end, adding ``arrivals[step]`` before each step; the batch size at every step."""
    sizes, step = [], 0
    while step <= max(arrivals) or len(batch):
        if step in arrivals:
            batch.add(arrivals[step])
        sizes.append(len(batch))
        batch.step()
        step += 1
    return sizes


def alone(engine: Engine, request: GenerationRequest):
    return decode_alone(engine, [request])[0]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_rows_joining_and_leaving_equal_alone(base, sampled):
    """Arrivals join after 0, 1, 2, ... steps of the running rows; each row's tokens (and logits) equal alone."""
    engine = Engine(base)
    arts = [engine.prepare(a) for a in artifacts(base)]
    reqs = staggered_requests(base, arts, sampled)
    done = {}
    batch = DecodeBatch(base, engine.eos_ids, on_finish=lambda r, res: done.__setitem__(id(r), res))
    arrivals = {0: reqs[:2], 1: [reqs[2]], 2: reqs[3:5], 4: [reqs[5]], 7: [reqs[6]]}  # step -> rows joining
    sizes = decode_with_arrivals(batch, arrivals)
    assert max(sizes) >= 3 and len(done) == len(reqs)  # rows really overlapped, and all ended
    for req in reqs:
        want, got = alone(engine, req), done[id(req)]
        assert got.tokens == want.tokens and len(got.tokens) == req.max_new_tokens
        for a, b in zip(got.logits, want.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cache_shrinks_when_the_longest_row_leaves():
    base = tiny_base("llama")
    batch = DecodeBatch(base, frozenset())
    long = GenerationRequest(base.tokenize("a long prompt of many byte tokens"), max_new_tokens=2, stop_ids=frozenset())
    short = GenerationRequest(base.tokenize("ab"), max_new_tokens=6, stop_ids=frozenset())
    batch.add([long, short])
    before = batch.cache_length()
    batch.step()
    batch.step()  # the long row ends here
    assert len(batch) == 1 and batch.cache_length() == len(short.prompt_ids) + 2 < before
    layer = batch.state.cache.layers[0]
    assert layer.keys.shape[-2] == batch.cache_length()
    while len(batch):
        batch.step()
    ref = GenerationRequest(short.prompt_ids, max_new_tokens=6, stop_ids=frozenset())
    assert decode_batch(base, [ref])[0].tokens == batch_results(base, [long, short])[1]


def batch_results(base, reqs):
    out = {}
    batch = DecodeBatch(base, frozenset(), on_finish=lambda r, res: out.__setitem__(id(r), res.tokens))
    batch.add([GenerationRequest(r.prompt_ids, max_new_tokens=r.max_new_tokens, stop_ids=frozenset()) for r in reqs])
    order = list(batch.requests)
    while len(batch):
        batch.step()
    return [out[id(r)] for r in order]


@pytest.fixture
def scheduler_factory():
    made = []

    def make(base, window_s=None, **kw):
        s = WindowScheduler(Engine(base), window_s, **kw) if window_s is not None else Scheduler(Engine(base), **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def test_scheduler_continuous_batching_equals_alone(scheduler_factory):
    """Requests submitted from threads at staggered times join the running batch; each equals its alone answer."""
    base = tiny_base("qwen2")
    sched = scheduler_factory(base, max_running=16).start()
    arts = [sched.engine.prepare(a) for a in artifacts(base)]
    reqs = staggered_requests(base, arts, sampling=True)
    futures = concurrently([lambda r=r: sched.submit(r) for r in reqs], stagger_s=0.01)
    for r, f in zip(reqs, futures, strict=True):
        assert f.result(timeout=60).tokens == alone(sched.engine, r).tokens
    text = sched.metrics.render().decode()
    assert "softprompts_batch_size_count" in text and sched.running == 0 and sched.pending == 0
    score = sched.submit(ScoreRequest(base.tokenize("a"), [base.tokenize(" b")], arts[2])).result(timeout=30)
    assert len(score) == 1 and score[0] < 0


def test_cancelled_row_leaves_and_others_finish(scheduler_factory):
    base = tiny_base("llama")
    sched = scheduler_factory(base).start()
    seen = threading.Event()
    endless = GenerationRequest(base.tokenize("abc"), max_new_tokens=200, stop_ids=frozenset(),
                                on_token=lambda tok, lp: seen.set())
    other = GenerationRequest(base.tokenize("xyz"), max_new_tokens=40, stop_ids=frozenset())
    f_endless = sched.submit(endless)
    f_other = sched.submit(other)
    assert seen.wait(30)
    sched.cancel(f_endless)
    assert f_other.result(timeout=60).tokens == alone(sched.engine, other).tokens
    assert f_endless.cancelled()
    deadline = time.time() + 10
    while sched.running and time.time() < deadline:
        time.sleep(0.01)
    assert sched.running == 0 and sched.admission.reserved == 0  # the cancelled row released its KV reservation


@pytest.mark.parametrize("where", ["request", "scheduler default"])
def test_deadline_ends_a_row_with_timeout(scheduler_factory, where):
    base = tiny_base("llama")
    # a deadline long enough for the first token on a loaded machine, far shorter than the decoding (>= 2.5 s)
    sched = scheduler_factory(base, timeout_s=0.5 if where != "request" else None).start()
    seen = threading.Event()
    req = GenerationRequest(base.tokenize("abc"), max_new_tokens=250, stop_ids=frozenset(),
                            on_token=lambda tok, lp: (seen.set(), time.sleep(0.01)))
    result = sched.submit(req, **({"timeout_s": 0.5} if where == "request" else {})).result(timeout=60)
    assert seen.is_set() and result.finish_reason == "timeout" and 0 < len(result.tokens) < 250


def test_full_queue_and_oversized_requests_are_refused(scheduler_factory):
    base = tiny_base("llama")
    per_token = kv_bytes_per_token(base)
    assert per_token == sum(2 * h * d * 4 for h, d in zip(base.shapes.kv_heads, base.shapes.head_dims, strict=True))
    sched = scheduler_factory(base, max_waiting=1, max_kv_bytes=20 * per_token)  # not started: nothing leaves
    small = GenerationRequest(base.tokenize("ab"), max_new_tokens=4)
    sched.submit(small)
    with pytest.raises(Overloaded, match="at capacity") as full:
        sched.submit(GenerationRequest(base.tokenize("ab"), max_new_tokens=4))
    assert full.value.retry_after >= 1
    with pytest.raises(Overloaded, match="KV cache"):
        sched.submit(GenerationRequest(base.tokenize("ab"), max_new_tokens=30))
    text = sched.metrics.render().decode()
    assert 'softprompts_rejected_total{reason="queue_full"} 1.0' in text
    assert 'softprompts_rejected_total{reason="kv_budget"} 1.0' in text


def test_kv_budget_limits_rows_running_together(scheduler_factory):
    """A budget that fits one request at a time: the rows run one after the other, both still correct."""
    base = tiny_base("llama")
    per_token = kv_bytes_per_token(base)
    reqs = [GenerationRequest(base.tokenize(p), max_new_tokens=8, stop_ids=frozenset()) for p in ["abcd", "wxyz"]]
    sched = scheduler_factory(base, max_kv_bytes=13 * per_token)
    futures = [sched.submit(r) for r in reqs]
    sched.start()
    for r, f in zip(reqs, futures, strict=True):
        assert f.result(timeout=60).tokens == alone(sched.engine, r).tokens
    text = sched.metrics.render().decode()
    assert 'softprompts_batch_size_bucket{le="1.0"} 16.0' in text  # all 16 steps ran one row


def test_window_mode_runs_a_batch_to_its_end(scheduler_factory):
    """``window_scheduler.py`` (``benchmarks/load_open_loop.py``'s baseline): the requests arriving together share
    one batch; one arriving later waits for it to end."""
    base = tiny_base("llama")
    sched = scheduler_factory(base, window_s=0.2)
    first = [GenerationRequest(base.tokenize(p), max_new_tokens=6, stop_ids=frozenset()) for p in ["ab", "cd"]]
    futures = [sched.submit(r) for r in first]
    sched.start()
    deadline = time.time() + 30
    while not sched.running and time.time() < deadline:
        time.sleep(0.005)
    late = sched.submit(GenerationRequest(base.tokenize("ef"), max_new_tokens=3, stop_ids=frozenset()))
    for r, f in zip(first, futures, strict=True):
        assert f.result(timeout=60).tokens == alone(sched.engine, r).tokens
    late.result(timeout=60)
    text = sched.metrics.render().decode()
    assert 'softprompts_batch_size_bucket{le="2.0"} 9.0' in text  # 6 steps of the pair, 3 of the late one alone


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill_equals_one_shot(base, chunk):
    """A prompt prefilled a few tokens at a time, interleaved with the running rows' steps, then joined: every row
    (its own and the running ones) gets exactly the tokens and logits it gets alone."""
    engine = Engine(base)
    arts = [engine.prepare(a) for a in artifacts(base)]
    raw_soft = artifacts(base)[0]  # a soft prompt as embeddings (not served KV): injected by the first chunk
    reqs = staggered_requests(base, arts)[:3]
    long = GenerationRequest(base.tokenize("a prompt long enough for a few chunks"), arts[2], 6, stop_ids=frozenset(),
                             collect_logits=True)
    soft = GenerationRequest(base.tokenize("another long prompt here"), raw_soft, 5, stop_ids=frozenset(),
                             collect_logits=True)
    done = {}
    batch = DecodeBatch(base, engine.eos_ids, on_finish=lambda r, res: done.__setitem__(id(r), res),
                        prefill_chunk=chunk)
    batch.add(reqs)
    for req in (long, soft):
        assert batch.prefills_alone(req)
        batch.add([req])
        while batch.prefilling:
            batch.advance_prefill()  # joins the batch once its prompt is in
            batch.step()  # the running rows go on between chunks
    while len(batch):
        batch.step()
    for req in [*reqs, long, soft]:
        want, got = alone(engine, req), done[id(req)]
        assert got.tokens == want.tokens
        for a, b in zip(got.logits, want.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_scheduler_chunks_long_prompts_and_cancels_them(scheduler_factory):
    base = tiny_base("llama")
    sched = scheduler_factory(base, prefill_chunk=4).start()
    long = [GenerationRequest(base.tokenize(p), max_new_tokens=5, stop_ids=frozenset())
            for p in ["a long prompt number one", "short", "another rather long prompt"]]
    futures = [sched.submit(r) for r in long]
    for r, f in zip(long, futures, strict=True):
        assert f.result(timeout=60).tokens == alone(sched.engine, r).tokens
    step = ChunkedPrefill.advance

    def slow_advance(self):
        time.sleep(0.05)
        return step(self)

    ChunkedPrefill.advance = slow_advance
    try:
        doomed = sched.submit(GenerationRequest(base.tokenize("x" * 120), max_new_tokens=5, stop_ids=frozenset()))
        time.sleep(0.1)
        sched.cancel(doomed)
        deadline = time.time() + 20
        while sched.running and time.time() < deadline:
            time.sleep(0.01)
    finally:
        ChunkedPrefill.advance = step
    assert doomed.cancelled() and sched.running == 0 and sched.admission.reserved == 0
    assert 'softprompts_finished_rows_total{reason="cancelled"} 1.0' in sched.metrics.render().decode()
