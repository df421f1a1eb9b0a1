"""``softprompts explain``: attention shares, the layer ablation's equivalences, nearest tokens, the CLI's files."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny import cached_base, perturb, perturbed, save_tiny, tiny_base
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import softprompts as sp
from softprompts.adapter import Adapter
from softprompts.adapter_io import save_adapter
from softprompts.cli import main
from softprompts.data.datasets import Example
from softprompts.errors import SoftpromptsError
from softprompts.evaluate import evaluate
from softprompts.explain import ExplainConfig, attention_shares, explain, kept_metric, nearest_tokens, write_report
from softprompts.model.artifacts import KVPrefix, OffsetPrompt, SoftPrompt
from softprompts.model.frozen import UnsupportedFeature

SPEC = sp.TaskSpec("classify", "{text}", " {label}", ["neg", "pos"])
ROPE_ARCHS = ["llama", "qwen2", "gemma3"]


def rows(n: int = 16, seed: int = 0) -> list[Example]:
    """Texts of varied bytes with seeded labels (the metric varies between adapters)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        label = rnd.choice(["neg", "pos"])
        out.append(Example("".join(rnd.choice("abcdefgh xyz") for _ in range(rnd.randint(3, 9))), " " + label, label))
    return out


def ids_of(base, text: str) -> torch.Tensor:
    return torch.tensor([base.tokenize(text)])


@pytest.mark.parametrize("arch", [*ROPE_ARCHS, "gpt2"])
def test_hiding_no_layer_is_the_adapter_and_some_layers_change_it(arch):
    base = cached_base(arch)
    served = base.served(perturbed(base, "prefix", 3, "hey", scale=2.0)())
    ids = ids_of(base, "some text")
    with_prefix = base.token_logits(served, ids)
    with base.hiding_virtual((0, 3), set()):
        torch.testing.assert_close(base.token_logits(served, ids), with_prefix)
    with base.hiding_virtual((0, 3), {1}):
        assert not torch.allclose(base.token_logits(served, ids), with_prefix, atol=1e-3)


@pytest.mark.parametrize("arch", ROPE_ARCHS)
def test_hiding_every_layer_is_the_bare_model(arch):
    """Virtual columns hidden in every layer: the real tokens' logits are the bare model's (RoPE: only relative
    positions enter attention, so the shift by P does not show)."""
    base = cached_base(arch)
    served = base.served(perturbed(base, "prefix", 3, "hey", scale=2.0)())
    ids = ids_of(base, "some text")
    with base.hiding_virtual((0, 3), {0, 1}):
        hidden = base.token_logits(served, ids)
    torch.testing.assert_close(hidden, base.token_logits(None, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(base.token_logits(served, ids), hidden, atol=1e-3)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_ablation_ends_are_the_adapter_and_the_bare_model(method):
    base = cached_base("llama")
    examples = rows()
    adapter = Adapter.from_method(perturbed(base, method, 4, "good", scale=3.0), base, SPEC)
    got = explain(base, adapter, examples, SPEC, ExplainConfig(limit=len(examples)))
    own, bare = evaluate(base, adapter, examples, SPEC)["accuracy"], evaluate(base, None, examples, SPEC)["accuracy"]
    assert own != bare  # the adapter changes predictions: the equivalences below could fail
    assert got.ablation.all == own and got.ablation.none == bare
    assert got.ablation.keep_first[-1] == own and got.ablation.keep_last[0] == own
    assert kept_metric(base, adapter, examples, SPEC, (0, 4), set(), ExplainConfig())["accuracy"] == bare
    assert got.metric == "accuracy" and got.layers == 2 and len(got.attention_share) == 2
    assert all(0.0 <= s <= 1.0 for s in got.attention_share)
    assert (got.nearest_tokens is not None) == (method == "prompt")


def test_dept_is_measured_with_its_offsets_on_and_they_apart(tmp_path):
    """DePT: its soft prompt's KV is probed with the offsets on the real tokens; hiding the virtual columns in every
    layer leaves the offsets alone (not the bare model), which ``offsets`` reports beside the soft prompt alone."""
    base = cached_base("llama")
    examples = rows()
    method = sp.create_method(base, "dept", num_virtual_tokens=4, init_text="good", rank=3, offset_positions=6)
    adapter = Adapter.from_method(perturb(method, scale=3.0, seed=2), base, SPEC)
    raw = adapter.artifact
    alone = OffsetPrompt(SoftPrompt(raw.embeds[:0]), raw.offsets)
    ids = ids_of(base, "some text")
    with base.hiding_virtual((0, 4), {0, 1}):
        hidden = base.token_logits(base.served(adapter), ids)
    torch.testing.assert_close(hidden, base.token_logits(alone, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(hidden, base.token_logits(None, ids), atol=1e-3)
    got = explain(base, adapter, examples, SPEC, ExplainConfig(limit=len(examples)))
    assert got.artifact_kind == "offset_prompt" and got.nearest_tokens is not None and got.virtual_tokens == 4
    accuracy = {name: evaluate(base, a, examples, SPEC)["accuracy"]
                for name, a in (("all", adapter), ("none", None), ("soft", raw.prompt), ("offsets", alone))}
    assert (got.ablation.all, got.ablation.none) == (accuracy["all"], accuracy["none"])
    assert (got.offsets.metric_soft_prompt_alone, got.offsets.metric_offsets_alone) == (accuracy["soft"],
                                                                                       accuracy["offsets"])
    assert got.offsets.positions == 6 and got.offsets.rank == 3 and got.offsets.norm_ratio > 0
    prompts = [base.tokenize(ex.prompt) for ex in examples]
    soft_share, _ = attention_shares(base, base.served(raw.prompt), prompts, 0)
    assert soft_share != pytest.approx(got.attention_share, abs=1e-4)  # the offsets were on
    write_report(got, tmp_path)
    assert "offsets alone" in (tmp_path / "explain.md").read_text()
    assert json.loads((tmp_path / "explain.json").read_text())["offsets"]["rank"] == 3


def test_attention_share_equals_a_direct_computation():
    """Layer 0 of tiny Llama (GQA) by hand: RoPE at positions P.., the prefix's keys in front, causal softmax."""
    base = cached_base("llama")
    attn, model = base.model.model.layers[0].self_attn, base.model.model
    gen = torch.Generator().manual_seed(0)
    P, T, heads, kv_heads, dim = 3, 6, 4, 2, 8
    prefix = KVPrefix([torch.randn(kv_heads, P, dim, generator=gen) * 2 for _ in range(2)],
                      [torch.randn(kv_heads, P, dim, generator=gen) for _ in range(2)])
    ids = torch.randint(0, 256, (1, T), generator=gen)
    x = model.layers[0].input_layernorm(model.embed_tokens(ids))
    q = attn.q_proj(x).view(1, T, heads, dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, T, kv_heads, dim).transpose(1, 2)
    cos, sin = model.rotary_emb(x, torch.arange(P, P + T)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys = torch.cat([prefix.keys[0][None], k], dim=2).repeat_interleave(heads // kv_heads, dim=1)  # [1, H, P+T, D]
    scores = q @ keys.transpose(-1, -2) * dim**-0.5
    causal = torch.ones(T, P + T, dtype=torch.bool).tril(P)
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    direct = probs[..., :P].sum(-1).mean(-1)[0]  # [H]
    got = base.virtual_attention(prefix, ids, None, (0, P))
    assert got.shape == (2, 1, heads)
    torch.testing.assert_close(got[0, 0], direct, atol=1e-5, rtol=1e-5)
    assert ((got >= 0) & (got <= 1)).all()
    assert not torch.allclose(got[0, 0, :1], got[0, 0, 1:2])  # heads differ: the mean over them is no shortcut


def test_nearest_tokens_of_a_prompt_initialized_from_text_are_its_tokens():
    base = cached_base("llama")
    method = sp.create_method(base, "prompt", num_virtual_tokens=5, init_text="hello")
    nearest = nearest_tokens(base, method(), top_k=3)
    assert [t[0].token for t in nearest] == list("hello")
    assert all(abs(t[0].cosine - 1.0) < 1e-4 and t[1].cosine < t[0].cosine for t in nearest)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(SoftpromptsError, match="--limit must be at least 1"):
        ExplainConfig(limit=0)
    base = cached_base("llama")
    adapter = Adapter.from_method(perturbed(base, "prefix", 2, "ok"), base, SPEC)
    with pytest.raises(SoftpromptsError, match="at least one row"):
        explain(base, adapter, [], SPEC)
    t5 = tiny_base("t5")
    with pytest.raises(UnsupportedFeature, match="encoder-decoder"):
        explain(t5, Adapter.from_method(perturbed(t5, "prefix", 2, "ok"), t5, SPEC), rows(2), SPEC)


def test_cli_writes_the_report(tmp_path, capsys):
    model_dir = save_tiny("llama", tmp_path / "llama")
    base = sp.load_base(str(model_dir))
    adapter_dir = save_adapter(Adapter.from_method(perturbed(base, "prompt", 3, "good"), base, SPEC),
                               tmp_path / "adapter")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": ex.prompt, "label": ex.label}) + "\n" for ex in rows(6)))
    out = tmp_path / "explain"
    assert main(["explain", "--adapter", str(adapter_dir), "--data", str(data), "--limit", "4", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["saved_parameters"] == 3 * 32 and summary["layers_for_90pct_gain"] in (1, 2)
    assert sorted(p.name for p in out.iterdir()) == ["attention_share.png", "explain.json", "explain.md",
                                                     "kv_norms.png", "layer_ablation.png"]
    report = json.loads((out / "explain.json").read_text())
    assert {"metric", "layers", "attention_share", "ablation", "nearest_tokens"} <= set(report)
    assert set(report["ablation"]) == {"all", "none", "keep_first", "keep_last"} and report["rows"] == 4
    assert len(report["ablation"]["keep_first"]) == report["layers"] == len(report["attention_share"]) == 2
    assert len(report["nearest_tokens"]) == 3
    assert main(["explain", "--adapter", str(tmp_path / "none"), "--data", str(data), "--out", str(out)]) == 2
    assert "none" in capsys.readouterr().err
    assert main(["explain", "--adapter", str(adapter_dir), "--data", str(data), "--out", str(out),
                 "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


def test_generation_task_hiding_ends():
    """A generate task runs through the decode loop (a cache growing in place): with every layer kept the outputs and
    perplexity are the adapter's, with every layer hidden the bare model's."""
    base = cached_base("llama")
    spec = sp.TaskSpec("generate", "{text}", " {label}", max_target_tokens=4)
    examples = [Example(ex.prompt, ex.target, None, ex.label) for ex in rows(6)]
    adapter = Adapter.from_method(perturbed(base, "prefix", 3, "ok", scale=3.0), base, spec)

    def run(artifact):
        got = evaluate(base, artifact, examples, spec, max_new_tokens=4, return_outputs=True)
        return got["outputs"], got["perplexity"]

    own, bare = run(adapter), run(None)
    assert own[0] != bare[0]
    with base.hiding_virtual((0, 3), set()):
        kept = run(adapter)
    with base.hiding_virtual((0, 3), {0, 1}):
        hidden = run(adapter)
    assert kept[0] == own[0] and kept[1] == pytest.approx(own[1], rel=1e-5)
    assert hidden[0] == bare[0] and hidden[1] == pytest.approx(bare[1], rel=1e-4)
