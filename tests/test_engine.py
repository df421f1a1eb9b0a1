"""Serving engine and registry on tiny models: each row of a mixed batch == that adapter alone.

Tolerance: logits of a mixed-batch row within ATOL = 1e-4 of the same request alone (float32; padding changes the
reduction order only), greedy tokens identical.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from tiny import decode_alone, perturbed, tiny_base

import softprompts as sp
from softprompts.model.decoder.inject import forward
from softprompts.model.generation import Sampling
from softprompts.serve import ContextLengthError, Engine, GenerationRequest, Registry, ScoreRequest
from softprompts.serve.registry import InvalidAdapterName, UnknownAdapter, check_name

ATOL = 1e-4
METHODS = ["prompt", "ptuning", "prefix", "deep"]
PROMPTS = ["abc", "hello there", "x", "some longer prompt", "qq", "zz top"]


def artifacts(base, lengths=(3, 5, 7, 4)):
    """One materialized (perturbed) artifact per method, of different virtual lengths."""
    return [perturbed(base, method, n, "serving text"[:n], scale=0.3, seed=i).materialize()
            for i, (method, n) in enumerate(zip(METHODS, lengths, strict=True))]


def requests(base, arts, **kw):
    rows = [None, *arts, arts[0]]  # no adapter, four methods, and the first one twice
    return [
        GenerationRequest(base.tokenize(p), a, max_new_tokens=3 + i % 3, stop_ids=frozenset(), **kw)
        for i, (p, a) in enumerate(zip(PROMPTS, rows, strict=True))
    ]


def check_mixed_equals_alone(base, atol: float = ATOL, rtol: float = 1e-4) -> None:
    """Each row of a mixed batch (no adapter, four methods, one twice) decodes the same greedy tokens as alone, its
    logits within ``atol`` / ``rtol`` (padding changes only the reduction order)."""
    engine = Engine(base)
    arts = [engine.prepare(a) for a in artifacts(base)]
    reqs = requests(base, arts, collect_logits=True)
    mixed = decode_alone(engine, reqs)
    for req, got in zip(reqs, mixed, strict=True):
        alone = decode_alone(engine, [req])[0]
        assert got.tokens == alone.tokens and len(got.tokens) == req.max_new_tokens
        for a, b in zip(got.logits, alone.logits, strict=True):
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)
    assert mixed[0].tokens != mixed[1].tokens or mixed[0].logits[0].ne(mixed[1].logits[0]).any()


def test_mixed_batch_rows_equal_alone(base):
    check_mixed_equals_alone(base)


def test_sampled_rows_are_reproducible_in_any_batch():
    base = tiny_base("gemma3")
    engine = Engine(base)
    arts = [engine.prepare(a) for a in artifacts(base)]
    sampling = Sampling(temperature=0.9, top_k=20, top_p=0.9, seed=7)
    reqs = requests(base, arts, sampling=sampling)
    mixed = decode_alone(engine, reqs)
    assert [decode_alone(engine, [r])[0].tokens for r in reqs] == [m.tokens for m in mixed]


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_cached_soft_prompt_kv_equals_recompute(base, method):
    soft = artifacts(base)[METHODS.index(method)]
    assert isinstance(soft, sp.SoftPrompt)
    engine = Engine(base)
    kv = engine.prepare(soft)
    assert isinstance(kv, sp.KVPrefix) and kv.length == soft.length
    assert engine.prepare(kv) is not soft and engine.prepare(None) is None
    ids = torch.tensor([base.tokenize("cached or not")])
    torch.testing.assert_close(forward(base, kv, ids).logits, forward(base, soft, ids).logits, atol=ATOL, rtol=1e-4)
    cached, again = (decode_alone(engine, [GenerationRequest(ids[0].tolist(), art, 5, collect_logits=True,
                                                             stop_ids=frozenset())]) for art in (kv, soft))
    assert cached[0].tokens == again[0].tokens
    for a, b in zip(cached[0].logits, again[0].logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


def test_stops_and_max_tokens():
    base = tiny_base("llama")
    engine = Engine(base)
    ids = base.tokenize("stop here")
    free = decode_alone(engine, [GenerationRequest(ids, None, 6, stop_ids=frozenset())])[0]
    assert len(free.tokens) == 6 and free.finish_reason == "length"
    by_token = decode_alone(engine, [GenerationRequest(ids, None, 6, stop_ids=frozenset({free.tokens[2]}))])[0]
    assert by_token.tokens == free.tokens[: free.tokens.index(free.tokens[2])] and by_token.finish_reason == "stop"
    by_check = decode_alone(engine, [GenerationRequest(ids, None, 6, stop_ids=frozenset(),
                                                       stop_check=lambda out: len(out) >= 2)])[0]
    assert by_check.tokens == free.tokens[:2] and by_check.finish_reason == "stop"
    streamed = []
    decode_alone(engine, [GenerationRequest(ids, None, 4, stop_ids=frozenset(),
                                            on_token=lambda tok, lp: streamed.append(tok))])
    assert streamed == free.tokens[:4]
    with pytest.raises(ContextLengthError, match="context limit is 256"):
        engine.base.check_fits(250, 5, 2)


def test_rank_classification_scores(base):
    engine = Engine(base)
    arts = [engine.prepare(a) for a in artifacts(base)]
    prompt = base.tokenize("Review: fine\nSentiment:")
    cands = [base.tokenize(" positive"), base.tokenize(" no")]
    reqs = [ScoreRequest(prompt, cands, a) for a in [None, arts[0], arts[2]]]
    together = engine.score(reqs)
    for req, scores in zip(reqs, together, strict=True):
        alone = engine.score([req])[0]
        assert scores == pytest.approx(alone, abs=1e-4)
        for cand, value in zip(cands, scores, strict=True):  # the sum of token log-probs, from a plain forward
            ids = torch.tensor([prompt + cand])
            logp = forward(base, req.artifact, ids).logits[0].log_softmax(-1)
            expected = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(cand))
            assert value == pytest.approx(expected, abs=1e-4)


def save(base, directory, method="prefix", n=4, task=None, seed=0):
    m = perturbed(base, method, n, "abcdefgh"[:n], scale=0.1, seed=seed)
    return sp.save_adapter(sp.Adapter.from_method(m, base, task=task), directory, overwrite=True)


def test_registry_validates_limits_memory_and_hot_loads(tmp_path):
    base = tiny_base("llama")
    engine = Engine(base)
    for i, method in enumerate(METHODS):
        save(base, tmp_path / f"a{i}", method, n=3 + i)
    save(tiny_base("gpt2"), tmp_path / "other-model")
    (tmp_path / "not-an-adapter").mkdir()
    one = sum(t.numel() * 4 for t in engine.prepare(sp.load_adapter(tmp_path / "a3", base).artifact).tensors().values())
    reg = Registry(base, tmp_path, prepare=engine.prepare, max_bytes=int(one * 2.5), poll_s=0)
    names = {e.name: e for e in reg.entries()}
    assert set(names) == {"a0", "a1", "a2", "a3", "other-model"}
    assert "tiny-gpt2" in names["other-model"].error and names["other-model"].artifact is None
    assert reg.loaded_bytes() <= int(one * 2.5)
    assert all(isinstance(reg.get(f"a{i}").artifact, sp.KVPrefix) for i in range(4))  # evicted ones reload
    assert reg.loaded_bytes() <= int(one * 2.5)
    with pytest.raises(sp.AdapterError):
        reg.get("other-model")
    with pytest.raises(UnknownAdapter):
        reg.get("nope")
    for bad in ["../a0", "a/b", "..", "a\\b", "", ".hidden"]:
        with pytest.raises(InvalidAdapterName):
            check_name(bad)
    held = reg.get("a2").artifact  # an in-flight request keeps its artifact through a reload
    time.sleep(0.01)
    save(base, tmp_path / "a2", "prefix", n=6, seed=3)
    os.utime(tmp_path / "a2" / "adapter.json")
    save(base, tmp_path / "new", "prompt", n=2)
    assert set(reg.scan()) == {"a2", "new"}
    assert reg.get("a2").num_virtual_tokens == 6 and reg.get("a2").version == 2 and held.length == 5
    reg.unload("new")
    assert "new" not in {e.name for e in reg.entries()} and reg.scan() == []
    with pytest.raises(UnknownAdapter):
        reg.get("new")
    assert reg.load("new").artifact.length == 2


def test_an_entry_a_request_holds_keeps_its_artifact_when_the_lru_drops_it(tmp_path):
    """The LRU dropping an adapter between ``registry.get`` and the request's use of the entry (placement reads
    ``entry.source``, the vLLM front saves its KV from it) leaves that entry whole: the registry's own entry is
    unloaded, the request's is not (else it would run on the bare model, or fail on ``None``)."""
    base = tiny_base("llama")
    engine = Engine(base)
    for name in ("a", "b"):
        save(base, tmp_path / name, "prompt", n=4)
    one = sum(t.numel() * 4 for t in engine.prepare(sp.load_adapter(tmp_path / "a", base).artifact).tensors().values())
    reg = Registry(base, tmp_path, prepare=engine.prepare, max_bytes=int(one * 1.5), poll_s=0)
    held = reg.get("a")
    reg.get("b")  # loads b: a is dropped
    assert {e.name: e.artifact is None for e in reg.entries()} == {"a": True, "b": False}
    assert held.artifact is not None and held.source is not None
    assert reg.get("a").artifact is not None  # and reloads on its next request


def test_registry_serves_prompt_table_tasks(tmp_path):
    """A prompt-table directory serves each task as DIR.TASK, equal to the task's own artifact; editing the table
    hot-reloads its tasks and a removed task stops being served."""
    from softprompts.table import PromptTable

    base = tiny_base("llama")
    engine = Engine(base)
    table = PromptTable.load(tmp_path / "tbl", create=True)
    for i, method in enumerate(METHODS):
        m = sp.create_method(base, method, num_virtual_tokens=2 + i, init="random", seed=i)
        table.add(f"t{i}", sp.Adapter.from_method(m, base, task={"task": "generate"}))
    table.save()
    save(base, tmp_path / "plain", "prompt", n=3)
    reg = Registry(base, tmp_path, prepare=engine.prepare, poll_s=0)
    assert {e.name for e in reg.entries()} == {"plain", "tbl.t0", "tbl.t1", "tbl.t2", "tbl.t3"}
    for i in range(4):
        served = reg.get(f"tbl.t{i}").artifact
        expected = engine.prepare(table.adapter(f"t{i}").artifact)
        assert served.length == 2 + i
        for key, tensor in expected.tensors().items():
            torch.testing.assert_close(served.tensors()[key], tensor, rtol=0, atol=0)
    prompt = base.tokenize("hello there")
    mixed = decode_alone(engine, [GenerationRequest(prompt, reg.get(f"tbl.t{i}").artifact, 4) for i in range(4)])
    alone = [decode_alone(engine, [GenerationRequest(prompt, engine.prepare(table.adapter(f"t{i}").artifact), 4)])[0]
             for i in range(4)]
    assert [r.tokens for r in mixed] == [r.tokens for r in alone]

    time.sleep(0.01)
    table.remove("t3")
    table.save()
    assert set(reg.scan()) == {"tbl.t0", "tbl.t1", "tbl.t2"}  # the table changed: its tasks reload
    assert "tbl.t3" not in {e.name for e in reg.entries()}
    with pytest.raises(UnknownAdapter):
        reg.get("tbl.t3")
    reg.unload("tbl.t1")
    assert reg.load("tbl.t1").artifact.length == 3
    with pytest.raises(UnknownAdapter):
        reg.load("tbl.nope")
    for i, junk in enumerate(["{not json", '{"tasks": null}', '{"tasks": ["a", "b"]}', '{"format": 1}']):
        (tmp_path / f"broken{i}").mkdir()
        (tmp_path / f"broken{i}" / "table.json").write_text(junk)
    reg.scan()  # broken tables become entries with their error; the registry keeps serving the rest
    entries = {e.name: e for e in reg.entries()}
    for i in range(4):
        assert entries[f"broken{i}"].artifact is None and entries[f"broken{i}"].error
        with pytest.raises(sp.AdapterError):
            reg.get(f"broken{i}")
    assert reg.get("tbl.t0").artifact is not None
    save(base, tmp_path / "tbl.t0", "prompt", n=2)  # an adapter directory named like a table task: the table wins
    with pytest.warns(UserWarning, match="already served"):
        reg.scan()
    assert reg.get("tbl.t0").table_task == "t0"


def test_pad_id_is_one_rule():
    """Every batch builder pads with ``BaseModel.pad_id``: the tokenizer's pad, else its EOS, else 0."""
    from tiny import make_tokenizer, tiny_model

    model = tiny_model("llama")
    with_pad = sp.BaseModel(model=model, tokenizer=make_tokenizer(), name="t")
    assert with_pad.pad_id == with_pad.tokenizer.pad_token_id == 256
    no_pad = make_tokenizer()
    no_pad.pad_token = None
    assert sp.BaseModel(model=model, tokenizer=no_pad, name="t").pad_id == no_pad.eos_token_id == 257
    assert sp.BaseModel(model=model, tokenizer=None, name="t").pad_id == 0


def test_one_decode_loop_for_the_library_and_the_engine(base):
    """``sp.generate_ids`` is the engine's loop: same greedy tokens, and a seeded sampled row is what it is alone."""
    engine = Engine(base)
    arts = [engine.prepare(a) for a in artifacts(base)]
    rows = [base.tokenize(p) for p in PROMPTS[:4]]
    library = sp.generate_ids(base, rows, arts, max_new_tokens=4, stop_ids=set())
    requests = [GenerationRequest(r, a, 4, stop_ids=frozenset()) for r, a in zip(rows, arts, strict=True)]
    served = decode_alone(engine, requests)
    assert library == [s.tokens for s in served]
    sampling = Sampling(temperature=1.0, top_k=10, seed=3)
    together = sp.generate_ids(base, rows, arts, max_new_tokens=4, sampling=sampling, stop_ids=set())
    alone = [sp.generate_ids(base, [r], a, 4, sampling, stop_ids=set())[0] for r, a in zip(rows, arts, strict=True)]
    assert together == alone
    assert sp.generate_ids(base, rows, arts, max_new_tokens=0) == [[], [], [], []]
    with pytest.raises(ValueError, match="max_new_tokens"):
        sp.generate_ids(base, rows, arts, max_new_tokens=-1)


def test_a_tiny_temperature_samples_the_best_token():
    """Found by the schema fuzzer: temperature 8e-119 made every score inf (and the request a 500)."""
    from softprompts.model.generation import choose_next

    logits = torch.tensor([[0.5, 2.0, -1.0], [3.0, 3.0, 0.0]])
    chosen = choose_next(logits, Sampling(temperature=8e-119, top_k=409, seed=0), torch.Generator().manual_seed(0))
    assert chosen[0] == 1 and chosen[1] in (0, 1)
