"""A base whose tokenizer adds BOS (Gemma, Llama) reads BOS first, once, in every evaluated, generated and served
sequence, the soft prompt after it (``placement.sequence_start``); a KV prefix stands in for it (BOS inside the
prefix). Checked on a tiny Llama whose tokenizer adds ``<bos>`` (``tiny.tiny_bos_base``) against the model run on
the token ids ``[BOS] + ...`` themselves; a base whose tokenizer adds none is unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import BOS_CHAT_TEMPLATE, BOS_ID, cached_base, perturbed, tiny_bos_base

import softprompts as sp
from softprompts.data.chat import ChatFormat
from softprompts.data.datasets import Example
from softprompts.evaluate import evaluate, generate_texts, target_logprobs
from softprompts.model.artifacts import SoftPrompt
from softprompts.model.decode_loop import generate_ids
from softprompts.model.placement import PlacementError, place
from softprompts.tasks import TaskSpec, collate, encode, split_prompt

X, T = "great film", "a note: "  # a prompt and a text for artifacts made of real tokens


@pytest.fixture(scope="module")
def base():
    return tiny_bos_base("llama")


def ids(base, text: str) -> list[int]:
    return base.tokenize(text)


def greedy(base, prompt_ids: list[int], n: int = 6) -> list[int]:
    """The bare model's greedy tokens after exactly ``prompt_ids`` (no rule applied: the reference)."""
    return generate_ids(base, [prompt_ids], None, max_new_tokens=n, stop_ids=set())[0]


def test_the_rule_reads_the_tokenizer(base):
    assert base.bos_lead == (BOS_ID,) and cached_base("llama").bos_lead == ()
    assert split_prompt(base, X) == ((BOS_ID,), ids(base, X))
    assert split_prompt(base, "Say<|virtual|>" + X) == ((BOS_ID, *ids(base, "Say")), ids(base, X))
    assert split_prompt(base, "<bos>" + X) == ((BOS_ID,), ids(base, X))  # a text that writes BOS keeps one
    # a base whose tokenizer adds none: as it always was
    plain = cached_base("llama")
    assert split_prompt(plain, X) == ((), ids(plain, X))
    assert split_prompt(plain, "Say<|virtual|>" + X) == (tuple(ids(plain, "Say")), ids(plain, X))


def test_a_chat_template_that_writes_bos_gets_no_second_one():
    base = tiny_bos_base("llama", chat_template=BOS_CHAT_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    for placement in ("start", "after-system", "user-start"):
        text = ChatFormat(base.tokenizer, placement).prompt_text(messages)
        assert text.count("<bos>") == 1
        lead, rest = split_prompt(base, text)
        assert lead[0] == BOS_ID and [*lead, *rest].count(BOS_ID) == 1, placement


def test_bare_generation_reads_bos_first(base):
    want = base.tokenizer.decode(greedy(base, [BOS_ID, *ids(base, X)]), skip_special_tokens=True)
    assert sp.generate(base, X, max_new_tokens=6) == want
    assert torch.equal(sp.next_token_logits(base, X), base.model(torch.tensor([[BOS_ID, *ids(base, X)]])).logits[0, -1])


def test_a_soft_prompt_follows_bos(base):
    """A soft prompt equal to the embeddings of T == the model on [BOS] + T + X: generated, scored and trained."""
    soft = SoftPrompt(base.embed(torch.tensor(ids(base, T))))
    want = greedy(base, [BOS_ID, *ids(base, T + X)])
    assert generate_texts(base, soft, [X], max_new_tokens=6) == [base.tokenizer.decode(want)]
    y = ids(base, " good")
    reference = target_logprobs(base, None, [[BOS_ID, *ids(base, T + X)]], [y])[0][0]
    spec = TaskSpec("classify", "{text}", " {label}", ["good", "bad"])
    (row,), _ = encode(base, [Example(X, " good", "good")], spec)
    assert row.lead_ids == (BOS_ID,) and BOS_ID not in row.prompt_ids
    batch = collate([row], base.pad_id)
    loss = base.label_loss_sum(soft, batch).item()
    assert loss == pytest.approx(-reference, abs=1e-4)


def test_a_kv_prefix_holds_bos(base):
    """The KV of a real prefill of [BOS] + T == the model on [BOS] + T + X (BOS is inside the prefix, not read again);
    after more text than BOS it is still refused."""
    prefix = base.text_to_kv([BOS_ID, *ids(base, T)])
    want = greedy(base, [BOS_ID, *ids(base, T + X)])
    assert generate_texts(base, prefix, [X], max_new_tokens=6) == [base.tokenizer.decode(want)]
    with pytest.raises(PlacementError):
        place(base, prefix, (BOS_ID, *ids(base, "Say")))


def test_a_prefix_method_starts_from_bos_and_is_not_refused(base):
    from softprompts.training.preflight import check_fits

    method = sp.create_method(base, "deep", num_virtual_tokens=4, init_text="ab")
    start = base.text_to_kv([BOS_ID, 257, *ids(base, "ab")])  # BOS in place of the first left filler (<eos>)
    assert torch.allclose(method().keys[0].float(), start.keys[0].float(), atol=1e-5)
    spec = TaskSpec("classify", "{text}", " {label}", ["good", "bad"])
    encoded, _ = encode(base, [Example(X, " good", "good")], spec)
    check_fits(base, method, spec, encoded, [])  # BOS alone in front: the prefix stands in for it
    marked, _ = encode(base, [Example("Say<|virtual|>" + X, " good", "good")], spec)
    with pytest.raises(PlacementError):
        check_fits(base, method, spec, marked, [])


def test_mixed_rows_each_equal_alone_and_served_equals_evaluated(base):
    soft = perturbed(base, "prompt", 3, "abc", seed=1)().detached()
    kv = perturbed(base, "deep", 3, "abc", seed=2)().detached()
    prompts = [X, "dull story", "fine"]
    rows = [soft, kv, None]
    mixed = generate_texts(base, rows, prompts, max_new_tokens=5)
    alone = [generate_texts(base, a, [p], max_new_tokens=5)[0] for a, p in zip(rows, prompts, strict=True)]
    assert mixed == alone
    spec = TaskSpec("classify", "{text}", " {label}", ["good", "bad"])
    examples = [Example(p, " good", "good") for p in prompts]
    assert evaluate(base, soft, examples, spec)["n"] == 3


def test_served_completions_equal_evaluated(base, tmp_path):
    from fastapi.testclient import TestClient

    from softprompts.serve.http import build_state, create_app

    soft = perturbed(base, "prompt", 3, "abc", seed=1)
    sp.save_adapter(sp.Adapter.from_method(soft, base), tmp_path / "soft")
    with TestClient(create_app(build_state(base, tmp_path, poll_s=0))) as client:
        for model, artifact in (("soft", soft().detached()), ("base", None)):
            got = client.post("/v1/completions", json={"model": model, "prompt": X, "max_tokens": 5,
                                                       "temperature": 0})
            assert got.status_code == 200, got.text
            want = generate_texts(base, artifact, [X], max_new_tokens=5)[0]
            assert got.json()["choices"][0]["text"] == want, model
        scored = client.post("/v1/completions", json={"model": "base", "prompt": X, "max_tokens": 0, "echo": True,
                                                      "logprobs": 0, "temperature": 0})
        assert scored.status_code == 200, scored.text  # BOS alone in front is no placement marker


def test_vllm_front_sends_bos_then_the_soft_prompt(base):
    from softprompts.interop.vllm import decode_prompt_embeds
    from softprompts.interop.vllm_requests import translate
    from softprompts.serve.registry import Entry

    method = perturbed(base, "prompt", 3, "abc", seed=1)
    artifact = method().detached()
    entry = Entry(name="soft", path=None, source=artifact, version=1)
    request = translate(base, entry, {"model": "soft", "prompt": X, "max_tokens": 3}, False, "tiny", None)
    sent = decode_prompt_embeds(request.body["prompt_embeds"][0])
    want = torch.cat([base.embed(torch.tensor([BOS_ID])), artifact.embeds, base.embed(torch.tensor(ids(base, X)))])
    assert torch.allclose(sent, want)


def test_a_gguf_file_that_adds_bos_keeps_it_through_the_conversion(tmp_path, monkeypatch):
    """``tokenizer.ggml.add_bos_token`` survives ``--model FILE.gguf``'s conversion: the converted tokenizer adds BOS
    (``bos_lead``), its config records the flag, and generation reads BOS first."""
    from test_gguf import write_tiny_gguf

    monkeypatch.setenv("SOFTPROMPTS_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "bos.gguf", bos=True)
    base = sp.load_base(str(path))
    bos = base.tokenizer.convert_tokens_to_ids("<eos>")
    assert base.bos_lead == (bos,)
    (converted,) = (tmp_path / "cache" / "models").iterdir()
    assert json.loads((converted / "tokenizer_config.json").read_text())["add_bos_token"] is True
    want = base.model(torch.tensor([[bos, *ids(base, X)]])).logits[0, -1]
    assert torch.equal(sp.next_token_logits(base, X), want)


def test_both_serving_engines_answer_the_same_on_a_bos_base(base, tmp_path):
    """``serve --engine vllm``'s front (against the fake vLLM of test_vllm_front, which decodes what it is sent with
    our model) == the default engine: texts and usage, for a soft prompt (BOS, then it) and a KV prefix (BOS
    inside it)."""
    from fastapi.testclient import TestClient
    from test_vllm_front import FakeVllm

    from softprompts.interop.vllm_front import SoftpromptsFront
    from softprompts.interop.vllm_launch import FrontConfig
    from softprompts.serve.http import build_state, create_app

    for seed, (name, method) in enumerate((("soft", "prompt"), ("prefix", "prefix"))):
        sp.save_adapter(sp.Adapter.from_method(perturbed(base, method, 3, "abc", seed=seed), base), tmp_path / name)
    config = FrontConfig(adapters=str(tmp_path), model="tiny", served_names=("base", "tiny"), poll_s=0)
    front = TestClient(SoftpromptsFront(FakeVllm(base), config, base))
    with TestClient(create_app(build_state(base, tmp_path, poll_s=0))) as ours:
        for name in ("soft", "prefix"):
            body = {"model": name, "prompt": [X, "abc"], "max_tokens": 5, "temperature": 0, "ignore_eos": True}
            got, want = front.post("/v1/completions", json=body), ours.post("/v1/completions", json=body)
            assert got.status_code == want.status_code == 200, (got.text, want.text)
            assert [c["text"] for c in got.json()["choices"]] == [c["text"] for c in want.json()["choices"]], name
            assert got.json()["usage"]["prompt_tokens"] == want.json()["usage"]["prompt_tokens"], name


def test_peft_baseline_evaluation_reads_bos_first_as_ours_does(base):
    """compare's PEFT rows are scored by PEFT's own forward and generate: on a BOS-reading base their prompts must
    start with BOS as ours do, so the bare model under PEFT's evaluation is the bare model of our rows (Gemma's LoRA
    scored 50 on dev at step 0 against the bare model's 69 when PEFT's prompts had no BOS)."""
    from softprompts.compare.peft_eval import hf_generate, prompt_ids, rank_classify
    from softprompts.evaluate import classify

    assert prompt_ids(base, X) == [BOS_ID, *ids(base, X)]
    prompts = [X, "dull story", "fine thing", "a b c d"]
    assert hf_generate(base.model, base, prompts, max_new_tokens=5) == generate_texts(base, None, prompts,
                                                                                       max_new_tokens=5)
    spec = TaskSpec("classify", "{text}", " {label}", ["good", "bad", "fine"])
    examples = [Example(p, " good", "good") for p in prompts]
    picks = rank_classify(base.model, base, prompts, [" good", " bad", " fine"])
    assert [spec.labels[i] for i in picks] == classify(base, None, examples, spec)
    scores = {(p, i): s for p in prompts for i, s in enumerate(_bare_scores(base, p, [" good", " bad", " fine"]))}
    assert len(set(scores.values())) > 1  # the scores differ: the picks above could tell BOS from none


def _bare_scores(base, prompt: str, targets: list[str]) -> list[float]:
    logits = base.model(torch.tensor([[BOS_ID, *ids(base, prompt)]])).logits[0, -1].log_softmax(-1)
    return [float(logits[ids(base, t)[0]]) for t in targets]
