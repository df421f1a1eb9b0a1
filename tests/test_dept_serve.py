"""DePT (``OffsetPrompt``: a soft prompt + embedding offsets on the prompt's first ``S`` real tokens) served, on tiny
random models, by equivalence.

Default engine, over HTTP (a live server): a DePT adapter beside a soft prompt, a prefix and the base model, sent at
once (the scheduler batches them): each answer == that adapter alone over HTTP == ``generate`` on the saved
(unserved) artifact; chat; echo logprobs == the log-softmax of ``forward`` with the artifact; classify == ``evaluate``
and ``target_logprobs``; the registry counts the KV and the offsets' bytes; on T5 and BART (offsets on the
encoder's input) a mixed batch == ``generate``. ``--engine vllm``'s front: the
``prompt_embeds`` it sends == the ``inputs_embeds`` our injection feeds the model (after a lead, on a BOS base, prompts
shorter and longer than ``S``), and the front's answers (against test_vllm_front's fake vLLM) == the default
engine's. A DePT adapter changes the answer from its soft prompt alone, so equality is the offsets' doing.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from live_server import live_server
from test_vllm_front import FakeVllm
from tiny import cached_base, concurrently, perturb, perturbed, tiny_base, tiny_bos_base

import softprompts as sp
from softprompts.data.datasets import Example
from softprompts.evaluate import classify, generate_texts, target_logprobs
from softprompts.interop.vllm import decode_prompt_embeds
from softprompts.interop.vllm_front import SoftpromptsFront
from softprompts.interop.vllm_launch import FrontConfig
from softprompts.interop.vllm_requests import translate
from softprompts.model.artifacts import OffsetPrompt, SoftPrompt
from softprompts.model.decode_loop import generate_ids
from softprompts.model.decoder.inject import forward
from softprompts.model.placement import place
from softprompts.serve.http import build_state, create_app
from softprompts.serve.plan import plan_generation
from softprompts.serve.registry import Entry, nbytes
from softprompts.serve.schemas import ChatBody, CompletionBody
from softprompts.tasks import TaskSpec, prompt_ids

S = 6  # offset positions: the short prompts below fit in them, the long ones run past them
PROMPTS = ["fine", "a fine film, truly", "dull"]
CLASSIFY = {"task": "classify", "prompt": "Review: {text}\nSentiment:", "target": " {label}",
            "labels": ["positive", "negative"]}
CHAT = [{"role": "user", "content": "hi"}]
NEW = 8


def dept(base, seed: int, n: int = 3):
    """A DePT module off its init (``B`` perturbed: the offsets are live) on the first ``S`` prompt tokens."""
    method = sp.create_method(base, "dept", num_virtual_tokens=n, init_text="abc"[:n], rank=3, offset_positions=S)
    return perturb(method, scale=0.3, seed=seed)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(HTTP client, server state, {name: raw artifact})``: "dept", "soft" (prompt tuning), "prefix" and "cls"
    (DePT with a classify task) on tiny Llama."""
    base = tiny_base("llama")
    root = tmp_path_factory.mktemp("adapters")
    methods = {"dept": (dept(base, 1), None), "soft": (perturbed(base, "prompt", 4, "abcd", 0.3, 2), None),
               "prefix": (perturbed(base, "prefix", 3, "abc", 0.3, 3), None), "cls": (dept(base, 4), CLASSIFY)}
    raw = {}
    for name, (method, task) in methods.items():
        adapter = sp.Adapter.from_method(method, base, task=task)
        sp.save_adapter(adapter, root / name)
        raw[name] = sp.load_adapter(root / name, base).artifact
    raw["base"] = None
    state = build_state(base, root, max_running=8, poll_s=0)
    with live_server(state) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, state, raw


def _post(client, path: str, body: dict) -> dict:
    answer = client.post(path, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _texts(answer: dict) -> list[str]:
    return [c["text"] for c in answer["choices"]]


def test_the_registry_serves_the_kv_and_the_offsets_and_counts_both(served):
    _, state, raw = served
    entry = state.registry.get("dept")
    assert isinstance(entry.artifact, OffsetPrompt) and entry.num_virtual_tokens == 3
    kv = state.engine.prepare(raw["dept"].prompt)
    assert entry.nbytes == nbytes(kv) + nbytes(raw["dept"]) - nbytes(raw["dept"].prompt)
    assert torch.equal(entry.artifact.offsets.dense(), raw["dept"].offsets.dense())


def test_a_mixed_batch_over_http_equals_each_alone_and_generate(served):
    client, _, raw = served
    names = ["dept", "soft", "prefix", "base"]
    jobs = [(name, prompt) for name in names for prompt in PROMPTS]

    def ask(name: str, prompt: str) -> str:
        body = {"model": name, "prompt": prompt, "max_tokens": NEW, "temperature": 0}
        return _texts(_post(client, "/v1/completions", body))[0]

    mixed = concurrently([lambda job=job: ask(*job) for job in jobs])
    alone = [ask(*job) for job in jobs]
    base = served[1].base
    want = [generate_texts(base, raw[name], [prompt], max_new_tokens=NEW)[0] for name, prompt in jobs]
    assert mixed == alone == want
    soft_part = [generate_texts(base, raw["dept"].prompt, [p], max_new_tokens=NEW)[0] for p in PROMPTS]
    assert mixed[: len(PROMPTS)] != soft_part  # the offsets change the answer


def test_several_prompts_and_choices_in_one_body(served):
    client, _, raw = served
    body = {"model": "dept", "prompt": PROMPTS, "max_tokens": NEW, "temperature": 0, "n": 2}
    want = generate_texts(served[1].base, raw["dept"], PROMPTS, max_new_tokens=NEW)
    assert _texts(_post(client, "/v1/completions", body)) == [w for w in want for _ in range(2)]


def test_chat_equals_generate_on_the_rendered_placed_prompt(served):
    client, state, raw = served
    body = {"model": "dept", "messages": CHAT, "max_tokens": NEW, "temperature": 0}
    answers = concurrently([lambda name=name: _post(client, "/v1/chat/completions", {**body, "model": name})
                            for name in ("dept", "soft", "base")])
    plan = plan_generation(state.base, state.registry.get("dept"), ChatBody.model_validate(body))
    (p,) = plan.prompts
    tokens = generate_ids(state.base, [p.ids], place(state.base, raw["dept"], p.lead), max_new_tokens=NEW,
                          stop_ids=set(plan.stop_ids))[0]
    want = state.base.tokenizer.decode(tokens, skip_special_tokens=True)
    assert answers[0]["choices"][0]["message"]["content"] == want
    assert answers[0]["usage"]["completion_tokens"] == len(tokens)


def test_echo_logprobs_are_the_forward_with_the_offsets(served):
    client, state, raw = served
    body = {"prompt": PROMPTS[1], "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}
    answers = concurrently([lambda name=name: _post(client, "/v1/completions", {**body, "model": name})
                            for name in ("dept", "soft", "base")])
    ids = torch.tensor([state.base.tokenize(PROMPTS[1])])
    for name, answer in zip(("dept", "soft", "base"), answers, strict=True):
        with torch.no_grad():
            logp = forward(state.base, raw[name], ids).logits[0].float().log_softmax(-1)  # [T, V]
        want = logp[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist()
        got = answer["choices"][0]["logprobs"]["token_logprobs"]
        assert got[0] is None and got[1:] == pytest.approx(want, abs=1e-5), name
    with torch.no_grad():
        no_offsets = forward(state.base, raw["dept"].prompt, ids).logits[0, :-1].float().log_softmax(-1)
    assert not torch.allclose(no_offsets.gather(1, ids[0, 1:, None])[:, 0], torch.tensor(
        answers[0]["choices"][0]["logprobs"]["token_logprobs"][1:]), atol=1e-3)


def test_classify_equals_evaluate(served):
    client, state, raw = served
    texts = ["great film", "awful plot that drags"]
    answer = _post(client, "/v1/classify", {"model": "cls", "texts": texts})
    spec = TaskSpec(**CLASSIFY)
    examples = [Example(spec.prompt.format(text=t), "", "positive") for t in texts]
    assert [r["label"] for r in answer["results"]] == classify(state.base, raw["cls"], examples, spec)
    for text, result in zip(texts, answer["results"], strict=True):
        lead, ids = prompt_ids(state.base, spec.prompt.format(text=text), spec)
        assert not lead
        targets = [state.base.tokenize(f" {label}") for label in spec.labels]
        want = [s for s, _ in target_logprobs(state.base, raw["cls"], [ids] * 2, targets)]
        assert [result["logprobs"][label] for label in spec.labels] == pytest.approx(want, abs=1e-5)


# -- the vLLM front -------------------------------------------------------------------------------------------------
def _injected(base, artifact, lead: tuple[int, ...], ids: list[int]) -> torch.Tensor:
    """``[k + P + T, hidden]``: the ``inputs_embeds`` our injection hands the model for ``ids`` after ``lead``."""
    seen = []

    def hook(_module, _args, kwargs):
        seen.append(kwargs["inputs_embeds"][0].detach().clone())

    handle = base.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            forward(base, place(base, artifact, lead), torch.tensor([ids]))
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("bos", [False, True])
def test_the_fronts_prompt_embeds_are_our_injections_input(bos):
    base = tiny_bos_base() if bos else tiny_base("llama")
    artifact = dept(base, 5)().detached()
    entry = Entry(name="dept", path=None, source=artifact, version=1)
    prompts = [PROMPTS[0], PROMPTS[1], "Say<|virtual|>" + PROMPTS[1]]  # shorter and longer than S; a lead of text
    request = translate(base, entry, {"model": "dept", "prompt": prompts, "max_tokens": 3}, False, "tiny", None)
    plan = plan_generation(base, entry, CompletionBody.model_validate({"model": "dept", "prompt": prompts,
                                                                       "max_tokens": 3}))
    assert request.virtual_tokens == 3
    for sent, p in zip(request.body["prompt_embeds"], plan.prompts, strict=True):
        sent = decode_prompt_embeds(sent)
        want = _injected(base, artifact, p.lead, p.ids)
        assert sent.shape == want.shape and torch.allclose(sent, want, atol=1e-6)
        plain = torch.cat([place(base, SoftPrompt(artifact.embeds), p.lead).embeds,
                           base.embed(torch.tensor(p.ids))])
        assert not torch.allclose(sent, plain, atol=1e-4)  # the offsets are in it
    assert bos == (plan.prompts[0].lead[:1] == base.bos_lead[:1] != ())


@pytest.mark.parametrize("bos", [False, True])
def test_both_engines_answer_the_same(bos, tmp_path):
    """The front against the fake vLLM (our decode on what it is sent; it finds the last real token back in the
    embedding table, so the prompts here run past ``S``) == the default engine: texts and usage."""
    base = tiny_bos_base() if bos else tiny_base("llama")
    sp.save_adapter(sp.Adapter.from_method(dept(base, 6), base), tmp_path / "dept")
    config = FrontConfig(adapters=str(tmp_path), model="tiny", served_names=("base", "tiny"), poll_s=0)
    front = TestClient(SoftpromptsFront(FakeVllm(base), config, base))
    body = {"model": "dept", "prompt": [PROMPTS[1], "another long prompt"], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}
    with TestClient(create_app(build_state(base, tmp_path, poll_s=0))) as ours:
        got, want = front.post("/v1/completions", json=body), ours.post("/v1/completions", json=body)
    assert got.status_code == want.status_code == 200, (got.text, want.text)
    assert _texts(got.json()) == _texts(want.json())
    assert got.json()["usage"]["prompt_tokens"] == want.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_mixed_batch_over_http_equals_generate(arch, tmp_path):
    """On T5 / BART the offsets go on the encoder's input (the soft prompt stays soft): DePT beside a soft prompt and
    the base at once over HTTP == ``generate`` on each saved artifact, and != DePT's soft prompt alone."""
    base = cached_base(arch)
    for name, method in (("dept", dept(base, 7)), ("soft", perturbed(base, "prompt", 3, "abc", 0.3, 8))):
        sp.save_adapter(sp.Adapter.from_method(method, base), tmp_path / name)
    raw = {name: sp.load_adapter(tmp_path / name, base).artifact for name in ("dept", "soft")} | {"base": None}
    jobs = [(name, prompt) for name in raw for prompt in PROMPTS]
    with live_server(build_state(base, tmp_path, max_running=8, poll_s=0)) as port, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        mixed = concurrently([lambda job=job: _texts(_post(client, "/v1/completions", {
            "model": job[0], "prompt": job[1], "max_tokens": NEW, "temperature": 0}))[0] for job in jobs])
    assert mixed == [generate_texts(base, raw[name], [p], max_new_tokens=NEW)[0] for name, p in jobs]
    assert mixed[: len(PROMPTS)] != generate_texts(base, raw["dept"].prompt, PROMPTS, max_new_tokens=NEW)
