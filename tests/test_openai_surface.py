"""The OpenAI surface real clients use, through the official ``openai`` client against a live server on a tiny model:
``/v1/models``, completions ``logprobs`` / ``echo`` (``max_tokens: 0``) / ``n`` / usage in the last stream chunk,
chat ``logprobs``, and a client that disconnects freeing its row. Every figure is checked against the engine alone
(forward log-softmax, ``Engine.score``, a request decoded by itself)."""

from __future__ import annotations

import math
import time

import httpx
import pytest
from live_server import openai_server
from tiny import decode_alone

from softprompts.model.decoder.decode import DecodeBatch
from softprompts.model.generation import GenerationRequest, Sampling
from softprompts.serve.engine import ScoreRequest

openai = pytest.importorskip("openai")
ATOL = 1e-4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with openai_server(tmp_path_factory.mktemp("surface"), "surface") as served:
        yield served


def joined(tokens: list[str]) -> str:
    """The text of logprobs token strings ("bytes:\\xNN" ones are parts of a character)."""
    raw = b"".join(bytes(int(h, 16) for h in t[6:].split("\\x")[1:]) if t.startswith("bytes:") else t.encode()
                   for t in tokens)
    return raw.decode("utf-8", "replace")


def alone(state, model: str, prompt: str, max_tokens: int, **kw):
    entry = None if model == "base" else state.registry.get(model)
    req = GenerationRequest(state.base.tokenize(prompt), entry.artifact if entry else None, max_tokens,
                            stop_ids=None, **kw)
    return decode_alone(state.engine, [req])[0]


def test_models_lists_base_and_every_adapter(server):
    client, _, _ = server
    ids = [m.id for m in client.models.list()]
    assert ids == ["base", "pre", "soft"]


@pytest.mark.parametrize("model", ["soft", "pre", "base"])
def test_completion_logprobs_equal_the_models_distribution(server, model):
    client, state, _ = server
    prompt = "logprobs of"
    got = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    choice = got.choices[0]
    want = alone(state, model, prompt, 4, collect_logits=True)
    assert choice.text == state.base.tokenizer.decode(want.tokens, skip_special_tokens=True)
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(want.tokens) == len(lp.top_logprobs)
    for step, (logits, token) in enumerate(zip(want.logits, want.tokens, strict=True)):
        logp = logits.log_softmax(-1)
        assert lp.token_logprobs[step] == pytest.approx(logp[token].item(), abs=ATOL)
        top = logp.topk(3)
        assert sorted(lp.top_logprobs[step].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=ATOL)
        assert max(lp.top_logprobs[step].values()) == pytest.approx(lp.token_logprobs[step], abs=ATOL)  # greedy
    assert lp.text_offset[0] == 0 and joined(lp.tokens) == choice.text


@pytest.mark.parametrize("model", ["soft", "pre"])
def test_echo_scores_the_prompt_like_loglikelihood_clients_expect(server, model):
    """``echo`` + ``logprobs`` + ``max_tokens: 0`` (lm-evaluation-harness's loglikelihood request): the prompt back,
    ``None`` for its first token, then each token's log-probability; the continuation's sum equals rank scoring."""
    client, state, _ = server
    context, continuation = "The review was", " great"
    got = client.completions.create(model=model, prompt=context + continuation, max_tokens=0, echo=True, logprobs=2)
    choice = got.choices[0]
    assert choice.text == context + continuation and choice.finish_reason == "length"
    lp = choice.logprobs
    ids = state.base.tokenize(context + continuation)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) and lp.text_offset[0] == 0
    ctx_len = len(state.base.tokenize(context))
    artifact = state.registry.get(model).artifact
    score = state.engine.score([ScoreRequest(ids[:ctx_len], [ids[ctx_len:]], artifact)])[0][0]
    assert sum(lp.token_logprobs[ctx_len:]) == pytest.approx(score, abs=1e-3)
    assert got.usage.completion_tokens == 0 and got.usage.prompt_tokens == len(ids)
    both = client.completions.create(model=model, prompt=context, max_tokens=3, echo=True, logprobs=0,
                                     temperature=0)
    generated = alone(state, model, context, 3)
    assert both.choices[0].text == context + state.base.tokenizer.decode(generated.tokens, skip_special_tokens=True)
    assert len(both.choices[0].logprobs.tokens) == ctx_len + len(generated.tokens)


def test_n_choices_are_each_seeded(server):
    client, state, _ = server
    got = client.completions.create(model="soft", prompt=["one", "two"], max_tokens=5, temperature=0.9, seed=11, n=3)
    assert [c.index for c in got.choices] == list(range(6))
    for c in got.choices:
        prompt, j = ["one", "two"][c.index // 3], c.index % 3
        want = alone(state, "soft", prompt, 5, sampling=Sampling(temperature=0.9, seed=11 + j))
        assert c.text == state.base.tokenizer.decode(want.tokens, skip_special_tokens=True)
    assert len({c.text for c in got.choices[:3]}) > 1  # different seeds, different samples
    greedy = client.completions.create(model="soft", prompt="one", max_tokens=5, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_streamed_completion_carries_logprobs_and_final_usage(server):
    client, _, _ = server
    kw = {"model": "pre", "prompt": "stream me", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.text for p in pieces) == whole.choices[0].text
    streamed = [v for p in pieces if p.logprobs for v in p.logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=ATOL)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_chat_logprobs(server):
    client, _, _ = server
    messages = [{"role": "user", "content": "hello"}]
    got = client.chat.completions.create(model="soft", messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = got.choices[0].logprobs.content
    assert joined([t.token for t in content]) == got.choices[0].message.content
    assert bytes(b for t in content for b in t.bytes).decode("utf-8", "replace") == got.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=ATOL)
        assert t.logprob <= 0
    streamed = list(client.chat.completions.create(model="soft", messages=messages, max_tokens=5, temperature=0,
                                                   logprobs=True, stream=True))
    values = [t.logprob for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert values == pytest.approx([t.logprob for t in content], abs=ATOL)
    plain = client.chat.completions.create(model="soft", messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == got.choices[0].message.content


def test_unsupported_fields_are_refused_by_name(server):
    client, _, _ = server
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.completions.create(model="base", prompt="x", frequency_penalty=1.0)
    with pytest.raises(openai.BadRequestError, match="'tools'"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"})
    neutral = client.completions.create(model="base", prompt="x", max_tokens=2, presence_penalty=0, best_of=1)
    assert len(neutral.choices) == 1


def finished(state, reason: str) -> float:
    return state.metrics.finished.labels(reason)._value.get()


def wait_idle(state, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while (state.scheduler.running or state.scheduler.pending) and time.time() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_disconnected_client_frees_its_row(server, stream, monkeypatch):
    """A client that leaves mid-generation: its row is cancelled (not decoded to max_tokens) and the server serves on.
    Each decode step is slowed to 10 ms so the 240 tokens asked for outlast the client."""
    client, state, url = server
    step = DecodeBatch.step

    def slow_step(self):
        time.sleep(0.01)
        step(self)

    monkeypatch.setattr(DecodeBatch, "step", slow_step)
    wait_idle(state)
    before = finished(state, "cancelled")
    body = {"model": "soft", "prompt": "go on", "max_tokens": 240, "temperature": 0, "stream": stream}
    with httpx.Client(base_url=url) as raw:
        if stream:
            with raw.stream("POST", "/v1/completions", json=body, timeout=30) as response:
                next(response.iter_lines())  # the first event arrived: the row decodes; now leave
        else:
            with pytest.raises(httpx.ReadTimeout):
                raw.post("/v1/completions", json=body, timeout=0.3)
    deadline = time.time() + 20
    while finished(state, "cancelled") == before and time.time() < deadline:
        time.sleep(0.02)
    assert finished(state, "cancelled") == before + 1
    wait_idle(state)
    assert state.scheduler.running == 0 and state.scheduler.admission.reserved == 0
    after = client.completions.create(model="soft", prompt="still here", max_tokens=2, temperature=0)
    assert after.choices[0].finish_reason in ("length", "stop") and math.isfinite(after.usage.total_tokens)

