"""What real clients send, answered as they expect (issue P): prompts as token ids (lm-evaluation-harness's default,
the official client's ``prompt=[ids]``), chat content as a list of text parts, the tokenizer routes clients probe,
vLLM's ``ignore_eos`` / ``min_tokens``, and usage counting the stop token. Every answer is checked against the same
request sent as text, or against the engine alone."""

from __future__ import annotations

import httpx
import pytest
from live_server import live_server, openai_server
from tiny import decode_alone, tiny_base

from softprompts.model.decode_loop import decode_batch
from softprompts.model.generation import GenerationRequest, hold_stops
from softprompts.serve.http import build_state

openai = pytest.importorskip("openai")
ATOL = 1e-4
MODELS = ["soft", "pre", "base"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with openai_server(tmp_path_factory.mktemp("clients"), "client") as served:
        yield served


def post(url: str, path: str, body: dict) -> httpx.Response:
    with httpx.Client(timeout=60) as http:
        return http.post(url + path, json=body)


# -- token-id prompts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_token_id_prompts_answer_as_their_text(server, model):
    client, state, _ = server
    texts = ["ids or text", "a second prompt"]
    ids = [state.base.tokenize(t) for t in texts]
    kw = {"model": model, "max_tokens": 5, "temperature": 0, "logprobs": 2}
    as_text = client.completions.create(prompt=texts, **kw)
    as_ids = client.completions.create(prompt=ids, **kw)
    flat = client.completions.create(prompt=ids[0], **kw)
    assert [c.text for c in as_ids.choices] == [c.text for c in as_text.choices]
    assert flat.choices[0].text == as_text.choices[0].text
    for got, want in zip(as_ids.choices, as_text.choices, strict=True):
        assert got.logprobs.token_logprobs == pytest.approx(want.logprobs.token_logprobs, abs=ATOL)
    assert as_ids.usage.prompt_tokens == as_text.usage.prompt_tokens == sum(map(len, ids))
    streamed = client.completions.create(prompt=ids[1], stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == as_text.choices[1].text


def test_token_id_echo_scores_each_sent_token(server):
    """lm-evaluation-harness's default loglikelihood request: ids with ``echo``, ``logprobs: 1``, ``max_tokens: 1``;
    its ``ctxlen`` indexes the echoed logprobs, so they must align one to one with the ids sent."""
    client, state, _ = server
    ids = state.base.tokenize("The review was great")
    got = client.completions.create(model="pre", prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0)
    want = client.completions.create(model="pre", prompt="The review was great", max_tokens=1, echo=True,
                                     logprobs=1, temperature=0)
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want.choices[0].logprobs.token_logprobs[1:], abs=ATOL)
    assert got.choices[0].text == want.choices[0].text


@pytest.mark.parametrize("prompt, status, needle", [
    ([5, 99999], 400, "prompt[1]: token id 99999 is outside"),
    ([[5, 6], [7, -1]], 400, "prompt[1][1]: token id -1"),
    ([], 422, "a list of token ids"),
    ([[1], []], 422, "each non-empty"),
    (["text", 3], 422, "a list of lists of token ids"),
    ([1.5], 422, "token ids are integers"),
])
def test_bad_token_id_prompts_are_named(server, prompt, status, needle):
    _, _, url = server
    answer = post(url, "/v1/completions", {"model": "base", "prompt": prompt, "max_tokens": 2})
    assert answer.status_code == status, answer.text
    assert needle in answer.json()["error"]["message"]


# -- chat content parts -----------------------------------------------------------------------------------------
def test_chat_content_as_text_parts(server):
    client, _, _ = server
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "two plus two?"}]
    kw = {"model": "soft", "max_tokens": 6, "temperature": 0}
    got = client.chat.completions.create(messages=[{"role": "system", "content": [parts[0]]},
                                                   {"role": "user", "content": parts}], **kw)
    want = client.chat.completions.create(messages=[{"role": "system", "content": "What is"},
                                                    {"role": "user", "content": "What is\ntwo plus two?"}], **kw)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage.prompt_tokens == want.usage.prompt_tokens


@pytest.mark.parametrize("part, status, needle", [
    ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, 400, "'image_url'"),
    ({"type": "text"}, 422, "needs 'text'"),
])
def test_chat_content_parts_other_than_text_are_refused(server, part, status, needle):
    _, _, url = server
    body = {"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}
    answer = post(url, "/v1/chat/completions", body)
    assert answer.status_code == status, answer.text
    assert needle in answer.json()["error"]["message"]


# -- tokenizer routes -------------------------------------------------------------------------------------------
def test_tokenizer_routes_round_trip(server):
    _, state, url = server
    text = "Tokenize me, ünïcode too"
    tokens = post(url, "/tokenize", {"prompt": text}).json()
    assert tokens["tokens"] == state.base.tokenize(text) and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == state.base.context_limit
    assert post(url, "/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": text}
    bad = post(url, "/detokenize", {"tokens": [1, state.base.vocab_size]})
    assert bad.status_code == 400 and "tokens[1]" in bad.json()["error"]["message"]
    with httpx.Client(timeout=30) as http:
        info = http.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == "<eos>" and info["chat_template"] == state.base.tokenizer.chat_template


def test_lm_eval_detects_the_remote_tokenizer(server):
    """lm-evaluation-harness's auto tokenizer backend probes ``/tokenizer_info`` and ``/tokenize``: both answer, so
    it tokenizes through the server and needs no ``tokenizer=`` argument."""
    utils = pytest.importorskip("lm_eval.utils")
    _, state, url = server
    assert utils.check_remote_tokenizer_support(url + "/v1/completions")
    remote = utils.RemoteTokenizer(url + "/v1/completions")
    assert remote.encode("hello there") == state.base.tokenize("hello there")
    assert remote.eos_token_id == state.base.tokenizer.eos_token_id


# -- ignore_eos, min_tokens, usage ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ending(tmp_path_factory):
    """A server whose model's end of sequence is the token greedy decoding of ``ids`` chooses third: plain requests
    end there, ``ignore_eos`` / ``min_tokens`` requests go on."""
    base = tiny_base("llama")
    ids = base.tokenize("count on it")
    greedy = decode_batch(base, [GenerationRequest(ids, None, 8, stop_ids=frozenset())])[0].tokens
    eos = greedy[2]
    assert eos not in greedy[:2]
    base.model.generation_config.eos_token_id = eos
    state = build_state(base, tmp_path_factory.mktemp("ending"), max_running=8, poll_s=0)
    with live_server(state) as port:
        yield state, f"http://127.0.0.1:{port}", ids, greedy, eos


def test_usage_counts_the_stop_token(ending):
    state, url, ids, greedy, _ = ending
    answer = post(url, "/v1/completions", {"model": "base", "prompt": ids, "max_tokens": 8, "temperature": 0}).json()
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["text"] == state.base.tokenizer.decode(greedy[:2], skip_special_tokens=True)
    assert answer["usage"]["completion_tokens"] == 3  # two tokens and the end of sequence, as vLLM counts


def test_ignore_eos_runs_to_the_limit(ending):
    state, url, ids, greedy, _ = ending
    body = {"model": "base", "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    answer = post(url, "/v1/completions", body).json()
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 8
    assert answer["choices"][0]["text"] == state.base.tokenizer.decode(greedy, skip_special_tokens=True)


def test_min_tokens_masks_the_stop_token_until_then(ending):
    state, url, ids, greedy, eos = ending
    held = decode_alone(state.engine, [GenerationRequest(ids, None, 8, stop_ids=frozenset({eos}), min_new_tokens=4,
                                                         collect_logits=True, logprobs=0)])[0]
    third = held.logits[2].clone()
    assert held.tokens[:2] == greedy[:2] and held.tokens[2] != eos
    third[eos] = float("-inf")
    assert held.tokens[2] == int(third.argmax())  # the best token that is not a stop token
    assert held.logprobs[2].logprob == pytest.approx(held.logits[2].log_softmax(-1)[held.tokens[2]].item(), abs=1e-5)
    body = {"model": "base", "prompt": ids, "max_tokens": 8, "temperature": 0, "min_tokens": 4}
    answer = post(url, "/v1/completions", body).json()
    assert answer["choices"][0]["text"] == state.base.tokenizer.decode(held.tokens, skip_special_tokens=True)
    assert len(held.tokens) >= 4


def test_min_tokens_defers_stop_strings(server):
    """A stop string that ends within the first ``min_tokens`` tokens' text does not end the answer."""
    client, state, _ = server
    kw = {"model": "base", "prompt": "stop or not", "max_tokens": 8, "temperature": 0}
    full = client.completions.create(**kw).choices[0].text
    stop = full[1]  # the tiny tokenizer has one token per byte: this character is the second token
    assert client.completions.create(stop=stop, **kw).choices[0].text == full[: full.index(stop)]
    later = full.find(stop, 4)
    want = full[:later] if later >= 0 else full
    assert client.completions.create(stop=stop, extra_body={"min_tokens": 4}, **kw).choices[0].text == want


def test_min_tokens_over_the_limit_is_refused(server):
    _, _, url = server
    answer = post(url, "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 2, "min_tokens": 3})
    assert answer.status_code == 422 and "min_tokens (3) is more than the token limit (2)" in answer.text


def test_hold_stops_masks_only_rows_under_their_minimum():
    import torch

    from softprompts.model.generation import GenerationResult

    logits = torch.zeros(3, 5)
    requests = [GenerationRequest([1], min_new_tokens=2), GenerationRequest([1], min_new_tokens=2),
                GenerationRequest([1], stop_ids=frozenset({4}), min_new_tokens=1)]
    results = [GenerationResult([7], "", 1), GenerationResult([7, 7], "", 1), GenerationResult([], "", 1)]
    held = hold_stops(logits, requests, results, frozenset({0, 3}))
    assert held[0, 0] == held[0, 3] == float("-inf") and held[0, 1] == 0
    assert torch.equal(held[1], logits[1]) and held[2, 4] == float("-inf") and held[2, 0] == 0
    assert logits.eq(0).all()  # the model's logits are left as they are
