"""The fused, chunked head + cross-entropy of training equals HF's head + ``cross_entropy`` in value and gradient,
holds fewer bytes at its peak, and is only used where the model's logits are the plain head of its hidden state."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_base, tiny_model

from softprompts.compare.latency import peak_bytes
from softprompts.methods import create_method
from softprompts.model.decoder.base import BaseModel
from softprompts.model.head_loss import chunk_rows, head_cross_entropy_sum
from softprompts.tasks import Encoded, collate
from softprompts.training.step import label_loss_sum, plain_label_loss_sum

METHODS = ["prompt", "ptuning", "prefix", "deep", "dept"]


def rows() -> list[Encoded]:  # ragged targets: the label block holds -100 where a row's target is shorter
    return [Encoded([5, 6, 7, 8, 9], [10, 11]), Encoded([12, 13], [14, 15, 16]), Encoded([17, 18, 19], [20])]


def loss_and_grads(base, method, loss_fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    method.zero_grad()
    loss = loss_fn(base, method(), collate(rows(), 0))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in method.parameters()]


@pytest.mark.injection  # hidden_at goes through the injection path: also run on the second transformers version
@pytest.mark.parametrize("name", METHODS)
def test_fused_head_equals_hf_head(base, name):
    assert base.plain_head
    torch.manual_seed(0)
    method = create_method(base, name, num_virtual_tokens=4, init="random")
    fused, fused_grads = loss_and_grads(base, method, label_loss_sum)
    plain, plain_grads = loss_and_grads(base, method, plain_label_loss_sum)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in plain_grads)
    for a, b in zip(fused_grads, plain_grads, strict=True):  # float32 summation order differs: relative to the scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def reference(hidden, head, labels):
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100,
                                             reduction="sum")


@pytest.mark.parametrize("chunk_bytes", [4 * 50, 4 * 50 * 7, 2**30])  # one row per chunk, 7 rows (ragged end), all
@pytest.mark.parametrize("bias", [False, True])
def test_chunks_give_the_loss_and_gradient_of_one_projection(chunk_bytes, bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = -100
    labels[2, 7] = -100
    assert chunk_rows(50, chunk_bytes) in (1, 7, 2**30 // 200)
    ours = head_cross_entropy_sum(hidden, head, labels, chunk_bytes=chunk_bytes)
    (ours_grad,) = torch.autograd.grad(ours * 0.37, hidden)  # a scale on the loss must reach the gradient
    ref = reference(hidden, head, labels)
    (ref_grad,) = torch.autograd.grad(ref * 0.37, hidden)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours_grad, ref_grad)
    assert ours_grad[0, :4].abs().sum() == 0  # unlabelled rows get no gradient


def test_without_gradient_only_the_loss_is_formed():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=False).requires_grad_(False)
    hidden, labels = torch.randn(5, 8), torch.randint(0, 30, (5,))
    ours = head_cross_entropy_sum(hidden, head, labels)
    assert ours.grad_fn is None
    torch.testing.assert_close(ours, reference(hidden, head, labels))


def test_a_trainable_head_is_refused():
    head = torch.nn.Linear(8, 30)
    with pytest.raises(ValueError, match="frozen output head"):
        head_cross_entropy_sum(torch.randn(2, 8), head, torch.zeros(2, dtype=torch.long))


def test_fused_head_peaks_below_the_plain_head():
    """Peak tensor bytes of loss + backward: the fused head holds one fp32 chunk, HF's head keeps [N, V] logits,
    their log-softmax and the logit gradient (CPU allocator events: deterministic)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 20_000, bias=False).requires_grad_(False)
    hidden = torch.randn(512, 64, requires_grad=True)
    labels = torch.randint(0, 20_000, (512,))
    logits_bytes = 512 * 20_000 * 4  # ~41 MB

    def fused():
        head_cross_entropy_sum(hidden, head, labels, chunk_bytes=logits_bytes // 8).backward()

    def plain():
        reference(hidden, head, labels).backward()

    fused_peak, plain_peak = peak_bytes(fused, "cpu"), peak_bytes(plain, "cpu")
    assert plain_peak >= 2 * logits_bytes
    assert fused_peak < logits_bytes / 2


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_autocast_matches_the_hf_head():
    """An fp32 model under bf16 autocast (``train --bf16``): same loss and gradients (scale included) up to bf16."""
    base = tiny_base("llama")
    torch.manual_seed(0)
    method = create_method(base, "prompt", num_virtual_tokens=4, init="random")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, fused_grads = loss_and_grads(base, method, label_loss_sum)
        plain, plain_grads = loss_and_grads(base, method, plain_label_loss_sum)
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=1e-1)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        assert relative_error(a, b) < 2e-2


def test_bf16_model_gradient_keeps_its_scale():
    """A bf16 model without autocast: the 1/N scale of the loss reaches the gradient in fp32 before one rounding.
    (Scaling in bf16 instead rounds 1/3 to 0.33398: +0.2%, and this seed's gradient lands 0.30% off.)"""
    torch.manual_seed(2)
    head = torch.nn.Linear(32, 300, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(3, 32, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 300, (3,))
    (ours,) = torch.autograd.grad(head_cross_entropy_sum(hidden, head, labels) / 3, hidden)
    exact_hidden = hidden.detach().double().requires_grad_(True)
    exact_loss = torch.nn.functional.cross_entropy(exact_hidden @ head.weight.double().T, labels, reduction="sum")
    (exact,) = torch.autograd.grad(exact_loss / 3, exact_hidden)
    assert ours.dtype == torch.bfloat16
    assert relative_error(ours, exact) < 1e-2
    assert abs((ours.double() * exact).sum() / (exact * exact).sum() - 1) < 1.5e-3  # the scale, not only the direction


@pytest.mark.parametrize("change", ["hook", "subclass", "multi_device_map"])
def test_heads_the_fused_path_cannot_trust_keep_the_hf_head(change):
    """Offload hooks (the weight is loaded in the hook), quantized Linear subclasses and models spread over several
    devices are projected by HF's head, never by the bare weight."""
    model = tiny_model("llama")
    if change == "hook":
        model.lm_head.register_forward_pre_hook(lambda module, args: None)  # e.g. accelerate's offload hook
    elif change == "subclass":
        class QuantizedLinear(torch.nn.Linear):
            pass

        head = QuantizedLinear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
        head.weight = model.lm_head.weight
        model.lm_head = head
    else:
        model.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": 0}
    assert not BaseModel(model=model, tokenizer=None, name=f"tiny-llama-{change}").plain_head
    assert BaseModel(model=tiny_model("llama"), tokenizer=None, name="tiny-llama").plain_head


def test_fused_training_follows_the_hf_head_training():
    """``train`` end to end with the fused head vs with HF's head: the same parameter updates up to float noise."""
    import copy

    from test_train import SPEC, examples, quiet

    import softprompts.training.step as train_module
    from softprompts.training import train

    base = tiny_base("llama")
    first = create_method(base, "deep", num_virtual_tokens=3, seed=0)
    second = copy.deepcopy(first)
    start = [p.detach().clone() for p in first.parameters()]
    config = quiet(steps=3, lr=1e-3, batch_size=4, grad_accum=2)
    train(base, first, examples(8), SPEC, config)
    original = train_module.label_loss_sum
    train_module.label_loss_sum = plain_label_loss_sum
    try:
        train(base, second, examples(8), SPEC, config)
    finally:
        train_module.label_loss_sum = original
    for s, a, b in zip(start, first.parameters(), second.parameters(), strict=True):
        assert (a - s).abs().sum() > 0
        assert relative_error(a - s, b - s) < 1e-2


def test_soft_capped_logits_keep_the_hf_head():
    """Gemma-2-style final-logit soft-capping transforms the head's output: the probe says so and training's loss
    goes through HF's head (same loss as ``plain_label_loss_sum``, which a plain head + CE would not give)."""
    model = tiny_model("gemma3")
    model.config.final_logit_softcapping = 2.0  # small cap: visibly changes the logits of the tiny model
    base = BaseModel(model=model, tokenizer=None, name="tiny-gemma3-softcap")
    assert not base.plain_head
    method = create_method(base, "prompt", num_virtual_tokens=4, init="random")
    with torch.no_grad():
        artifact = method()
        batch = collate(rows(), 0)
        used = label_loss_sum(base, artifact, batch)
        hf = plain_label_loss_sum(base, artifact, batch)
        from softprompts.model.decoder.inject import hidden_at

        uncapped = head_cross_entropy_sum(hidden_at(base, artifact, batch.input_ids, batch.attention_mask,
                                                    batch.positions), model.get_output_embeddings(), batch.labels)
    assert torch.equal(used, hf)
    assert not torch.allclose(uncapped, hf, rtol=1e-3)


@pytest.mark.slow  # the benchmark as a subprocess
def test_head_loss_benchmark_runs(tmp_path):
    """``benchmarks/head_loss.py`` (the GPU anchor's head-only check) runs and reports both systems side by side."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "head_loss.py"
    out = subprocess.run([sys.executable, str(script), "--rows", "256", "--hidden", "32", "--vocab", "4000",
                          "--dtype", "bfloat16", "--reps", "2", "--json"], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert result["hf_s"] > 0 and result["fused_s"] > 0
    assert result["fused_peak_bytes"] < result["hf_peak_bytes"]  # one [256, 4000] chunk vs logits + fp32 + grads
