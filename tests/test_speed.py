"""Speed helpers on tiny random models: checkpointing is exact for every method, the label-only LM head is exact,
the step matches a plain one-batch loss, peak-memory probes measure, and the benchmark runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_base

from softprompts.compare.latency import peak_bytes
from softprompts.errors import SoftpromptsError
from softprompts.methods import create_method
from softprompts.model.decoder.inject import forward
from softprompts.tasks import Encoded, collate
from softprompts.training.config import TrainConfig
from softprompts.training.grad_checkpoint import checkpointing, decoder_layers
from softprompts.training.step import accumulate_step, compiled_loss, label_loss_sum, plain_label_loss_sum

METHODS = ["prompt", "ptuning", "prefix", "deep"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["llama", "gemma3", "gpt2"])
def base(request):
    return tiny_base(request.param)


def rows() -> list[Encoded]:
    return [Encoded([5, 6, 7, 8, 9], [10, 11]), Encoded([12, 13], [14, 15, 16]), Encoded([17, 18, 19], [20])]


def grads(base, name: str, checkpoint: bool, micro: int = 1, loss_fn=label_loss_sum) -> list[torch.Tensor]:
    torch.manual_seed(0)
    method = create_method(base, name, num_virtual_tokens=4, init="random")
    data = rows()
    batches = [collate(data[i::micro], 0) for i in range(micro)]
    n_tokens = sum(len(r.target_ids) for r in data)
    accumulate_step(base, method, method.artifact_kind, batches, n_tokens, checkpoint_layers=checkpoint,
                    loss_fn=loss_fn)
    return [p.grad.clone() for p in method.parameters()]


@pytest.mark.parametrize("name", METHODS)
def test_checkpointing_gives_the_same_gradients(base, name):
    plain, ckpt = grads(base, name, False), grads(base, name, True)
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["prompt", "deep"])
def test_micro_batches_equal_one_batch(base, name):
    one, three = grads(base, name, False, micro=1), grads(base, name, True, micro=3)
    for a, b in zip(one, three, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # one compile per case, seconds each; the fullgraph compiled loss below stays in test-fast
@pytest.mark.parametrize("name", METHODS)
def test_compiled_step_has_no_graph_breaks(base, name):
    """The micro-batch loss (forward with the method's artifact, label-only head, CE) is ONE dynamo graph."""
    import torch._dynamo as dynamo

    method = create_method(base, name, num_virtual_tokens=4, init="random")
    leaves = {k: t.detach().requires_grad_(True) for k, t in method().tensors().items()}
    from softprompts.model.artifacts import artifact_from_tensors

    dynamo.reset()
    explained = dynamo.explain(plain_label_loss_sum)(base, artifact_from_tensors(method.artifact_kind, leaves),
                                               collate(rows(), 0))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("name", ["prompt", pytest.param("prefix", marks=pytest.mark.slow)])
def test_compiled_loss_gives_the_same_gradients(name):
    """Through AOTAutograd (the ``aot_eager`` backend: same graph capture as inductor, no C++ toolchain needed)."""
    base = tiny_base("llama")
    plain = grads(base, name, False)
    compiled = grads(base, name, False, loss_fn=compiled_loss("aot_eager", fullgraph=True))  # a break would raise
    for a, b in zip(plain, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_loss_refuses_checkpointing():
    """Validated once, in the configuration (the step itself no longer checks)."""
    with pytest.raises(SoftpromptsError, match="cannot be combined"):
        TrainConfig(compile=True, gradient_checkpointing=True).validate()


def test_checkpointing_restores_the_layers(base):
    layers = decoder_layers(base.model)
    assert len(layers) == base.shapes.num_layers
    with checkpointing(base):
        assert all("forward" in vars(layer) for layer in layers)
    assert not any("forward" in vars(layer) for layer in layers)


def test_checkpointing_actually_recomputes(base):
    """Under checkpointing each decoder layer runs twice per forward+backward (forward and replay)."""
    method = create_method(base, "deep", num_virtual_tokens=3, init="random")
    batch = collate(rows(), 0)
    calls = []
    inner = [next(layer.children()) for layer in decoder_layers(base.model)]  # the replay calls layer.forward
    hooks = [module.register_forward_pre_hook(lambda *_: calls.append(1)) for module in inner]
    try:
        with checkpointing(base):
            label_loss_sum(base, method(), batch).backward()
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 2 * base.shapes.num_layers


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_label_positions_head_equals_full_head(base, name):
    """The loss with the LM head only at label positions equals the loss from full-vocab logits at every position."""
    method = create_method(base, name, num_virtual_tokens=4, init="random")
    batch = collate(rows(), 0)
    with torch.no_grad():
        artifact = method()
        ours = label_loss_sum(base, artifact, batch)
        full = forward(base, artifact, batch.input_ids, batch.attention_mask).logits  # [B, T, V]
        labels = torch.full(batch.input_ids.shape, -100)
        labels[:, batch.positions] = batch.labels  # column t predicts column t + 1
        ref = torch.nn.functional.cross_entropy(full.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_cpu_peak_bytes_measures_live_tensors():
    def work():
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(2_000_000)  # 8 MB, 12 MB live
        del a
        c = torch.ones(500_000)  # 10 MB live
        return b, c

    peak = peak_bytes(work, "cpu")
    assert 12_000_000 <= peak < 12_500_000


@pytest.mark.slow
def test_benchmark_tiny_json(tmp_path):
    """The benchmark's tiny bf16 configuration runs every method and prints one JSON object per method."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--tiny", "--reps", "2", "--json",
         "--checkpointing", "--dtype", "bfloat16"],  # the --device cuda path (random-init config, bf16), tiny
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["method"] for r in records] == ["prompt", "prefix", "ptuning", "deep"]
    for r in records:
        assert {"ours_s", "peft_s", "limit_s", "ours_peak_bytes", "peft_peak_bytes", "device"} <= set(r)
        assert r["ours_s"] > 0 and r["limit_s"] > 0 and r["ours_peak_bytes"] > 0


def test_accumulate_step_is_the_training_loop_step():
    """One optimizer step of ``train.train`` equals ``accumulate_step`` + clip + AdamW on the same batch (the
    benchmark's "ours" is the real loop's step)."""
    import copy

    from test_train import SPEC, examples, quiet

    from softprompts.tasks import encode, epoch_batches
    from softprompts.training import train

    base = tiny_base("llama")
    data = examples(8)
    method = create_method(base, "prefix", num_virtual_tokens=3, init="random", projection_dim=8, projection_hidden=8)
    twin = copy.deepcopy(method)
    start = [p.detach().clone() for p in twin.parameters()]
    config = quiet(steps=1, batch_size=4, grad_accum=2, lr=1e-2, warmup_ratio=0.0, schedule="constant")
    train(base, method, data, SPEC, config)

    encoded = encode(base, data, SPEC)[0]
    rows = [encoded[i] for i in epoch_batches(len(encoded), [e.length for e in encoded], 4, 0, 0)[0]]
    batches = [collate(rows[i::2], base.tokenizer.pad_token_id) for i in range(2)]
    torch.manual_seed(0)
    twin.train()
    optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.0)
    accumulate_step(base, twin, twin.artifact_kind, batches, float(sum(len(r.target_ids) for r in rows)))
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(start, twin.parameters(), strict=True))
    for a, b in zip(method.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
