"""Residual prompt tuning (``methods/residual_prompt.py``) on tiny random models, by equivalence.

Beyond the conformance matrix (which runs it like every method): at its zero-gain init it IS prompt tuning at the
same init; the saved adapter (the MLP folded in and dropped) gives the training-time output and is a plain soft
prompt on disk, in a prompt table and in a served mixed batch; the MLP branch really trains; the "separate" variant
has one MLP per token; bad options are one error listing every problem.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from test_conformance import logits as any_logits
from test_train import SPEC, examples, quiet
from tiny import cached_base, decode_alone, perturb, perturbed, saved_table, tiny_model

import softprompts as sp
from softprompts.interop import export_peft, import_peft
from softprompts.methods import MethodError
from softprompts.model.decoder.inject import forward
from softprompts.model.generation import GenerationRequest
from softprompts.serve import Engine

ATOL = 1e-4
TEXT = "classify it"
INPUT = "a fine film"
TASK = {"task": "generate", "prompt": "{text}", "target": " {label}"}


def residual(base, n: int = 6, **options):
    """A residual prompt moved off its init (its gain, shift and MLP perturbed: the MLP branch is live)."""
    options.setdefault("init_text", TEXT)
    return perturb(sp.create_method(base, "residual", num_virtual_tokens=n, **options), scale=0.5, seed=3)


def live_logits(base, module, text: str = INPUT) -> torch.Tensor:
    with torch.no_grad():
        return forward(base, module(), torch.tensor([base.tokenize(text)])).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("init", ["labels", "text", "vocab", "random"])
def test_zero_gain_init_is_prompt_tuning_at_the_same_init(arch, init):
    """gamma = beta = 0 at step 0: the artifact is prompt tuning's, bit for bit, for every init (shared start)."""
    base = cached_base(arch)
    options = dict(num_virtual_tokens=5, init=init, init_text=TEXT, labels=["neg", "pos"], seed=4)
    ours = sp.create_method(base, "residual", **options)
    plain = sp.create_method(base, "prompt", **options)
    assert torch.equal(ours().embeds, plain().embeds)
    assert torch.equal(ours.materialize().embeds, plain.materialize().embeds)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "t5"])
@pytest.mark.parametrize("shared", [True, False])
def test_saved_adapter_equals_training_time_output(arch, shared, tmp_path):
    """Saved (MLP folded in, dropped) and loaded == the training module's output; on disk one [P, d] soft prompt."""
    base = cached_base(arch)
    module = residual(base, shared=shared)
    assert not torch.allclose(module().embeds, module.embeds)  # the MLP branch contributes
    directory = sp.save_adapter(sp.Adapter.from_method(module, base, task=TASK), tmp_path / "residual")
    loaded = sp.load_adapter(directory, base)
    assert loaded.method == "residual" and loaded.artifact.kind == "soft_prompt"
    tensors = load_file(str(directory / "adapter.safetensors"))
    assert [tuple(t.shape) for t in tensors.values()] == [(6, base.shapes.hidden_size)]  # no MLP weights saved
    x = torch.tensor([base.tokenize(INPUT)])
    with torch.no_grad():  # decoder-only: logits over the input; encoder-decoder: the decoder's, after its start
        saved, live = any_logits(base, loaded.artifact, x), any_logits(base, module(), x)
    torch.testing.assert_close(saved, live, atol=1e-5, rtol=1e-5)


def test_mlp_branch_trains_and_only_the_method_trains():
    """A few steps move the gain off zero and, through it, the shared MLP; the base model stays bit for bit."""
    base = cached_base("llama")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    method = sp.create_method(base, "residual", num_virtual_tokens=4, init_text=TEXT, bottleneck=16)
    down = method.down.detach().clone()
    sp.train(base, method, examples(16), SPEC, quiet(steps=3, lr=5e-2, batch_size=8, warmup_ratio=0))
    assert method.gain.abs().max() > 0 and not torch.equal(method.down, down)
    assert (method().embeds - method.embeds).abs().max() > 1e-3  # E' != E: the reparameterization is used
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items())


def test_separate_variant_has_one_mlp_per_token():
    """shared=False: P MLPs (the paper's "separate" variant); trainable counts follow the docstring's formula."""
    base = cached_base("llama")
    d, m, p = base.shapes.hidden_size, 8, 5
    for shared, mlps in ((True, 1), (False, p)):
        method = sp.create_method(base, "residual", num_virtual_tokens=p, bottleneck=m, shared=shared)
        assert method.num_trainable() == p * d + mlps * (2 * d * m + m + 3 * d)
    # separate MLPs: the same embedding in two slots comes out differently once the MLPs differ
    method = perturb(sp.create_method(base, "residual", num_virtual_tokens=2, bottleneck=m, shared=False))
    with torch.no_grad():
        method.embeds[1] = method.embeds[0]
        out = method().embeds
    assert not torch.allclose(out[0], out[1])


def test_bad_options_are_one_error_listing_each():
    base = cached_base("llama")
    with pytest.raises(MethodError) as err:
        sp.create_method(base, "residual", bottleneck=0, shared="yes")
    message = str(err.value)
    assert "bottleneck must be a positive integer" in message and "shared must be true or false" in message
    with pytest.raises(MethodError, match="unknown option"):
        sp.create_method(base, "residual", encoder="mlp")


def test_in_a_prompt_table_and_a_served_mixed_batch(tmp_path):
    """As a table task beside prompt tuning and a prefix, and as a served row (its KV cached, as any soft prompt's):
    each row of a mixed batch == that adapter alone, and the served row == the training module's output."""
    base = cached_base("llama")
    module = residual(base, n=4)
    adapters = {"res": sp.Adapter.from_method(module, base, task=TASK),
                "pt": sp.Adapter.from_method(perturbed(base, "prompt", 3, "abc"), base, task=TASK),
                "pre": sp.Adapter.from_method(perturbed(base, "prefix", 5, "hello"), base, task=TASK)}
    table = saved_table(tmp_path / "t", base, adapters)
    rows = ["res", "pt", None, "pre", "res"]
    tokens = [base.tokenize(t) for t in ["good", "bad film", "plain", "x", "a fine film"]]
    ids, mask = sp.model.padding.pad_rows(tokens, 256, base.device)
    mixed = forward(base, table.context(rows), ids, mask).logits
    for i, (name, t) in enumerate(zip(rows, tokens, strict=True)):
        art = adapters[name].artifact if name else None
        alone = forward(base, art, torch.tensor([t])).logits[0]
        torch.testing.assert_close(mixed[i, -len(t):], alone, atol=2e-4, rtol=1e-4)

    engine = Engine(base)
    arts = [engine.prepare(a.artifact) for a in adapters.values()] + [None]
    reqs = [GenerationRequest(base.tokenize(p), a, max_new_tokens=3, stop_ids=frozenset(), collect_logits=True)
            for p, a in zip(["a fine film", "abc", "hello", "zz"], arts, strict=True)]
    together = decode_alone(engine, reqs)
    for req, got in zip(reqs, together, strict=True):
        alone = decode_alone(engine, [req])[0]
        assert got.tokens == alone.tokens
        torch.testing.assert_close(got.logits[0], alone.logits[0], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(together[0].logits[0], live_logits(base, module)[0, -1], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_exports_as_peft_prompt_tuning_and_round_trips(arch, tmp_path):
    """PEFT has no residual prompt tuning, but the saved adapter is a plain soft prompt: it exports as PEFT
    ``PROMPT_TUNING``, PEFT gives our logits with it, and importing it back restores method, options and tensors."""
    peft = pytest.importorskip("peft")
    from test_peft_interop import assert_real_close, batch, peft_logits  # that module needs peft

    base = cached_base(arch)
    adapter = sp.Adapter.from_method(residual(base, n=5), base, task=TASK)
    out = export_peft(adapter, tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(tiny_model(arch), str(out)).eval()
        ids, mask = batch(base, "right")
        theirs = peft_logits(model, ids, mask, 5, soft=True)
    assert_real_close(forward(base, adapter.artifact, ids, mask).logits, theirs, mask, atol=1e-5)
    back = import_peft(out, base)
    assert (back.method, back.method_config) == ("residual", adapter.method_config)
    assert torch.equal(back.artifact.embeds, adapter.artifact.embeds)
