"""vLLM's engine gives our engine's greedy tokens, against the real vLLM (``make test-vllm``, in ``.venv-vllm``).

One batch per engine mixes base requests, a soft prompt (vLLM's ``prompt_embeds``) and three KV-prefix adapters
(prefix tuning, a deep prompt, a cartridge: ``softprompts.interop.vllm_kv``'s connector) on 3 prompts each; the
tokens must equal ``generate_ids`` on the embedded SmolLM2 at fp32. Controls in the same batch: the KV requests'
placeholder prompts sent without their KV (no ``kv_transfer_params``, unsalted) must give other tokens, so the
equality comes from the loaded KV, not from the placeholders. A request whose KV file does not load (a layer
missing), or lies outside the connector's KV directory (a copy elsewhere, a symbolic link out of it: never opened),
ends with ``finish_reason == "error"`` and no tokens, and the rest of its batch is unaffected.

Engines: block size 32 and 128 with prefix caching off; block size 32 with prefix caching on, where the batch runs
twice (the placeholder block is found cached, salted per adapter, and the connector loads only the rest of the
prefix); block size 32 with a KV pool too small for the batch, so that running requests are preempted and must get
their prefix again when they resume.
"""

from __future__ import annotations

import gc
import os

import pytest

# not "vllm" itself: tests/ is on sys.path (conftest), where tests/vllm would import as an empty namespace package
pytest.importorskip("vllm.config", reason="vLLM is not installed in this environment; run make test-vllm")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny import perturbed  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import softprompts as sp  # noqa: E402
from softprompts.interop.vllm import prompt_embeds  # noqa: E402
from softprompts.interop.vllm_kv import kv_request, kv_transfer_config, save_kv  # noqa: E402
from softprompts.model.decode_loop import generate_ids  # noqa: E402
from softprompts.model.embedded import embedded_dir  # noqa: E402

NEW_TOKENS = 40  # enough decoding to grow every request past a 32-token block (the preemption case needs it)
TEXTS = ["Review: a fine, warm film with a great cast.\nSentiment:",
         "Question: what is the capital of France?\nAnswer:",
         "Translate to French: good morning\nFrench:"]
# (method, virtual tokens, init text): the two KV prefixes have the same length (37: more than a 32-token block, not
# a multiple of it), so only the cache salt keeps their cached placeholder blocks apart
ADAPTERS = [("prompt", 8, "Answer briefly."), ("prefix", 37, "You are a helpful assistant. Answer briefly."),
            ("deep", 37, "Reply in one short sentence, please."),
            ("cartridge", 64, "The Eiffel Tower is in Paris. It was built in 1889 for the World's Fair.")]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The base model, its adapters, the prompts and our engine's tokens for every (adapter, prompt)."""
    torch.manual_seed(0)
    base = sp.load_base(dtype="float32")
    ids = [base.tokenize(text) for text in TEXTS]
    adapters = {}
    for seed, (method, n, init_text) in enumerate(ADAPTERS):
        adapters[method] = sp.Adapter.from_method(perturbed(base, method, n, init_text, scale=0.1, seed=seed), base)
    expected = {"base": generate_ids(base, ids, None, max_new_tokens=NEW_TOKENS, stop_ids=set())}
    for name, adapter in adapters.items():
        expected[name] = generate_ids(base, ids, adapter.artifact, max_new_tokens=NEW_TOKENS, stop_ids=set())
        assert expected[name] != expected["base"], f"the {name} adapter does not change the base's tokens"
    directory = tmp_path_factory.mktemp("kv")
    kv_files = {name: save_kv(a.artifact, directory / f"{name}.safetensors") for name, a in adapters.items()
                if name != "prompt"}
    prefix = adapters["prefix"].artifact
    save_file({"layers.0.key": prefix.keys[0].contiguous(), "layers.0.value": prefix.values[0].contiguous()},
              str(directory / "broken.safetensors"))  # layer 0 only: the load fails at layer 1
    outside = tmp_path_factory.mktemp("elsewhere") / "prefix.safetensors"  # a good file the connector must not open
    outside.write_bytes(kv_files["prefix"].read_bytes())
    os.symlink(outside, directory / "link.safetensors")
    return base, ids, adapters, expected, kv_files, [directory / "broken.safetensors", outside,
                                                     directory / "link.safetensors"]


def vllm_batch(base, ids, adapters, kv_files, broken):
    """``(label, prompt, SamplingParams)`` for every (adapter or base, prompt), interleaved."""
    greedy = {"temperature": 0.0, "max_tokens": NEW_TOKENS, "ignore_eos": True}
    rows = []
    for i, (text, prompt_ids) in enumerate(zip(TEXTS, ids, strict=True)):
        rows.append(("base", i, {"prompt_token_ids": prompt_ids}, SamplingParams(**greedy)))
        soft = adapters["prompt"].artifact.embeds
        rows.append(("prompt", i, {"prompt_embeds": prompt_embeds(base.model, base.tokenizer, soft, text)},
                     SamplingParams(**greedy)))
        for name, path in kv_files.items():
            prompt, extra = kv_request(path, prompt_ids)
            rows.append((name, i, prompt, SamplingParams(**greedy, extra_args=extra)))
            rows.append((f"{name} without its KV", i, {"prompt_token_ids": prompt["prompt_token_ids"]},
                         SamplingParams(**greedy)))
        if i == 1:
            for path in broken:
                prompt, extra = kv_request(path, prompt_ids)
                rows.append(("broken", i, prompt, SamplingParams(**greedy, extra_args=extra)))
    return rows


# (block size, prefix caching, KV cache blocks): None sizes the pool from VLLM_CPU_KVCACHE_SPACE; 6 blocks (5 usable,
# 160 tokens) cannot hold the batch, so running requests are preempted and resumed, and must get their prefix again
CONFIGS = [pytest.param(32, False, None, id="block32"), pytest.param(128, False, None, id="block128"),
           pytest.param(32, True, None, id="block32-prefix-caching"),
           pytest.param(32, False, 6, id="block32-preempted")]


@pytest.mark.parametrize(("block_size", "prefix_caching", "blocks"), CONFIGS)
def test_vllm_gives_our_greedy_tokens(case, block_size, prefix_caching, blocks):
    base, ids, adapters, expected, kv_files, broken = case
    pool = {"num_gpu_blocks_override": blocks, "max_model_len": 160} if blocks else {"max_model_len": 512}
    llm = LLM(model=str(embedded_dir()), dtype="float32", enforce_eager=True, block_size=block_size,
              enable_prefix_caching=prefix_caching, enable_prompt_embeds=True, disable_log_stats=False,
              kv_transfer_config=kv_transfer_config(kv_dir=str(kv_files["prefix"].parent)), seed=0, **pool)
    try:
        rows = vllm_batch(base, ids, adapters, kv_files, broken)
        for _ in range(2 if prefix_caching else 1):  # with caching, the second run reuses the salted blocks
            outputs = llm.generate([r[2] for r in rows], [r[3] for r in rows], use_tqdm=False)
            got = {(label, i): list(out.outputs[0].token_ids) for (label, i, _, _), out in zip(rows, outputs,
                                                                                                strict=True)}
            failed = [out.outputs[0] for (label, _, _, _), out in zip(rows, outputs, strict=True) if label == "broken"]
            assert [(f.finish_reason, list(f.token_ids)) for f in failed] == [("error", [])] * len(broken)
            want = {(label, i): expected[label][i] for label, i, _, _ in rows if label in expected}
            wrong = {key: (got[key], want[key]) for key in want if got[key] != want[key]}
            assert not wrong, f"vLLM (got) vs ours (want), per (adapter, prompt): {wrong}"
            for name in kv_files:  # the controls: placeholders alone do not give the adapter's tokens
                assert any(got[(f"{name} without its KV", i)] != want[(name, i)] for i in range(len(TEXTS))), name
        if blocks:
            preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
            assert preemptions > 0, "the small KV pool was meant to preempt requests"
    finally:
        del llm
        gc.collect()


def _tiny_llama(directory, kv_heads: int):
    """A random 2-layer Llama with ``kv_heads`` KV heads (4 query heads) and SmolLM2's tokenizer, saved for vLLM."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_dir()))
    torch.manual_seed(kv_heads)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sp.load_base(str(directory), dtype="float32")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallelism on vLLM's CPU build needs a core per rank")
@pytest.mark.parametrize("kv_heads", [pytest.param(2, id="heads-split"), pytest.param(1, id="head-replicated")])
def test_tensor_parallel_ranks_load_their_kv_heads(tmp_path, monkeypatch, kv_heads):
    """TP=2: each rank writes its slice of the KV heads (2 heads: one each; 1 head: both ranks hold it)."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (vLLM's automatic binding wants NUMA)
    base = _tiny_llama(tmp_path / "model", kv_heads)
    ids = [base.tokenize(text) for text in TEXTS[:2]]
    rows, want = [], []
    greedy = {"temperature": 0.0, "max_tokens": 20, "ignore_eos": True}
    for seed, method in enumerate(["prefix", "deep"]):
        adapter = sp.Adapter.from_method(perturbed(base, method, 37, "You are a helpful assistant.", 0.3, seed), base)
        path = save_kv(adapter.artifact, tmp_path / f"{method}.safetensors")
        for prompt_ids, tokens in zip(ids, generate_ids(base, ids, adapter.artifact, max_new_tokens=20,
                                                        stop_ids=set()), strict=True):
            prompt, extra = kv_request(path, prompt_ids)
            rows.append((prompt, SamplingParams(**greedy, extra_args=extra)))
            want.append(tokens)
    for prompt_ids, tokens in zip(ids, generate_ids(base, ids, None, max_new_tokens=20, stop_ids=set()), strict=True):
        rows.append(({"prompt_token_ids": prompt_ids}, SamplingParams(**greedy)))
        want.append(tokens)
    assert want[0] != want[-2], "the adapter does not change the tiny model's tokens"
    llm = LLM(model=str(tmp_path / "model"), dtype="float32", enforce_eager=True, tensor_parallel_size=2,
              distributed_executor_backend="mp", kv_transfer_config=kv_transfer_config(), max_model_len=256,
              block_size=32, seed=0)
    try:
        outputs = llm.generate([r[0] for r in rows], [r[1] for r in rows], use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == want
    finally:
        del llm
        gc.collect()


def test_rank_heads_follow_vllms_split():
    from softprompts.interop.vllm_kv import VllmKVError, rank_heads

    assert [rank_heads(4, 2, r) for r in range(2)] == [slice(0, 2), slice(2, 4)]
    assert [rank_heads(2, 4, r) for r in range(4)] == [slice(0, 1), slice(0, 1), slice(1, 2), slice(1, 2)]
    assert rank_heads(3, 1, 0) == slice(0, 3)
    with pytest.raises(VllmKVError, match="cannot be split"):
        rank_heads(3, 2, 0)
