"""A quantized frozen base (``--quantize nf4|int8``): what it records, how adapters cross between precisions, its
errors, and the commands on it. The equivalences (a soft prompt of token embeddings equals the tokens, KV prefixes,
cached decoding, mixed batches, only the adapter trains) run on quantized bases in test_conformance.py."""

from __future__ import annotations

import importlib
import json
import warnings

import pytest
import torch
from tiny import cached_base, perturbed, save_tiny

import softprompts as sp
from softprompts.cli import main
from softprompts.data.datasets import Example
from softprompts.evaluate import evaluate
from softprompts.model.quantize import QuantizationError, quantization_of


def linear_weight_bytes(model) -> int:
    """Bytes held by the decoder's linear layers' weights, whatever tensor type stores them."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            weight = module.weight
            inner = [weight.qdata, weight.scale] if hasattr(weight, "qdata") else [weight.data]
            total += sum(t.numel() * t.element_size() for t in inner)
    return total


@pytest.mark.parametrize("name, kind, most", [("llama-nf4", "nf4", 0.2), ("llama-int8", "int8", 0.3)])
def test_quantized_base_stores_linear_weights_small_and_keeps_embeddings(name, kind, most):
    full, quantized = cached_base("llama"), cached_base(name)
    assert quantized.quantization == quantization_of(quantized.model) == kind and full.quantization is None
    assert linear_weight_bytes(quantized.model) <= most * linear_weight_bytes(full.model)
    embedding = quantized.model.get_input_embeddings().weight
    assert embedding.dtype == torch.float32 and torch.equal(embedding, full.model.get_input_embeddings().weight)
    assert quantized.weights_fingerprint() == f"{full.weights_fingerprint()}-{kind}"


def test_adapters_cross_precisions_with_the_other_weights_warning(tmp_path):
    full, quantized = cached_base("llama"), cached_base("llama-nf4")
    sp.save_adapter(sp.Adapter.from_method(perturbed(quantized, "prefix", 3, "abc"), quantized), tmp_path / "q")
    sp.save_adapter(sp.Adapter.from_method(perturbed(full, "prompt", 3, "abc"), full), tmp_path / "f")
    meta = json.loads((tmp_path / "q" / "adapter.json").read_text())
    assert meta["base_model"]["quantization"] == "nf4"
    with pytest.warns(sp.BaseWeightsWarning, match="quantized nf4.*in full precision"):
        sp.load_adapter(tmp_path / "q", full)
    with pytest.warns(sp.BaseWeightsWarning, match="in full precision.*quantized nf4"):
        sp.load_adapter(tmp_path / "f", quantized)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.load_adapter(tmp_path / "q", quantized)  # the same precision: no warning


def test_unknown_quantization_and_missing_backend_are_clear_errors(tmp_path, monkeypatch):
    model = save_tiny("llama", tmp_path / "m")
    with pytest.raises(QuantizationError, match="unknown quantization 'fp3'; choose one of nf4, int8"):
        sp.load_base(str(model), quantize="fp3")
    real = importlib.import_module

    def without_bitsandbytes(name, *args):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_bitsandbytes)
    with pytest.raises(QuantizationError, match=r"needs bitsandbytes .*pip install 'softprompts\[quantize\]'"):
        sp.load_base(str(model), quantize="nf4")


def test_train_eval_generate_on_a_quantized_base(tmp_path, capsys):
    model = save_tiny("llama", tmp_path / "model")
    rows = [{"text": ("nice " if i % 2 else "poor ") + "y" * (i % 5), "label": "pos" if i % 2 else "neg"}
            for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = ["--template", "Review: {text}\\nSentiment:", "--target", " {label}"]
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(model), "--quantize", "nf4", "--method", "prefix", "--data", str(data),
                 *template, "--steps", "2", "--virtual-tokens", "2", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "adapter.json").read_text())["base_model"]["quantization"] == "nf4"
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--model", str(model), "--quantize", "nf4", "--data", str(data),
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    base = cached_base("llama-nf4")
    adapter = sp.load_adapter(out, base)
    examples = [Example(f"Review: {r['text']}\nSentiment:", f" {r['label']}", r["label"]) for r in rows]
    want = evaluate(base, adapter, examples, adapter.task)
    assert metrics["accuracy"] == pytest.approx(want["accuracy"]) and metrics["n"] == 12
    assert main(["generate", "--adapter", str(out), "--model", str(model), "--quantize", "int8",
                 "--max-new-tokens", "3", "nice day"]) == 0


def test_compare_on_a_quantized_base_records_it(tmp_path):
    model = save_tiny("llama", tmp_path / "model")
    rows = [{"text": ("nice " if i % 2 else "poor ") + "y" * (i % 5), "label": "pos" if i % 2 else "neg"}
            for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "compare"
    assert main(["compare", "--model", str(model), "--quantize", "int8", "--data", str(data), "--eval-data", str(data),
                 "--test-data", str(data), "--template", "Review: {text}\\nSentiment:", "--target", " {label}",
                 "--methods", "prompt", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "compare.json").read_text())["quantize"] == "int8"
    adapter = next(out.rglob("adapter.json"))
    assert json.loads(adapter.read_text())["base_model"]["quantization"] == "int8"


def packable_nf4_pair(tmp_path, monkeypatch):
    """A tiny Llama saved once and loaded twice: in fp32 and ``--quantize nf4``, as if on a CPU with AVX512-BF16.

    Its linear layers have shapes bitsandbytes' CPU inference repacking takes (``N % 32 == 0``, ``K % 64 == 0``;
    ``tiny.py``'s hidden size 32 is below nf4's block of 64), and ``has_avx512bf16`` answers yes, so the repacking
    path that broke training is there to take wherever the test runs."""
    import bitsandbytes.nn.modules
    from tiny import make_tokenizer, scaled_up
    from transformers import AutoModelForCausalLM, LlamaConfig

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    config = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=256, eos_token_id=257, bos_token_id=257)
    torch.manual_seed(0)
    model = scaled_up(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    with torch.no_grad():  # std 0.2 at width 64 saturates the softmax: smaller, so a loss has room to fall
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.5)
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    return sp.load_base(str(tmp_path / "m")), sp.load_base(str(tmp_path / "m"), quantize="nf4")


def test_nf4_soft_prompt_gradient_is_the_dequantized_models(tmp_path, monkeypatch):
    """After a forward without gradient (the shape probe, an initialization, a bare evaluation), the gradient of a
    soft prompt through the nf4 base equals the one through an fp32 model holding the same nf4 weights dequantized:
    relative error < 1e-4 (fp32 summation order; both dequantize the same codes to fp32). Before the fix the 4-bit
    layers had been repacked for inference and their backward was missing: gradient 0, relative error 1."""
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    full, nf4 = packable_nf4_pair(tmp_path, monkeypatch)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nf4.model(input_ids=ids)
        for name, module in nf4.model.named_modules():
            if isinstance(module, Linear4bit):
                weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
                full.model.get_submodule(name).weight.copy_(weight)

    def prompt_grad(base) -> torch.Tensor:
        prompt = base.embed(torch.arange(40, 46)).detach().requires_grad_(True)  # [6, H]
        embeds = torch.cat([prompt.expand(2, -1, -1), base.embed(ids)], dim=1)
        logits = base.model(inputs_embeds=embeds).logits[:, 6:-1]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return prompt.grad

    want, got = prompt_grad(full), prompt_grad(nf4)
    assert want.norm() > 0
    assert (got - want).norm() < 1e-4 * want.norm()


SIX_WAY = sp.TaskSpec("classify", "Item: {text}\nKind:", " {label}", ["a", "b", "c", "d", "e", "f"],
                      max_prompt_tokens=40)


def six_way_examples() -> list[Example]:
    """12 rows of a 6-label task: the label is the text's first letter (byte tokens: one token per label)."""
    words = ["apple", "bread", "cider", "dates", "eggs", "figs"]
    return [Example(f"Item: {w}{'!' * (i % 2)}\nKind:", f" {w[0]}", w[0]) for i, w in enumerate(words * 2)]


@pytest.mark.parametrize("method", [m for m in sp.METHODS if m != "cartridge"])  # cartridge: trained on a corpus
def test_every_method_learns_a_six_way_task_on_nf4_as_on_fp32(tmp_path, monkeypatch, method):
    """Full-batch training (deterministic losses) from the same initialization: the nf4 base's loss falls by at
    least half of what the fp32 base's falls in 15 steps, and the fp32 one falls by > 0.5 nats.

    The tolerance (half) is for the 4-bit rounding of every linear weight (~10% relative at these random weights),
    which makes the two bases different functions whose trajectories differ, not for anything in training. Before the
    fix the nf4 gradient to every adapter was 0 (the layers repacked for inference after the shape probe): its loss
    did not fall at all (a fall of 0 against fp32's)."""
    from softprompts.training import TrainConfig, train

    falls = []
    for base in packable_nf4_pair(tmp_path, monkeypatch):
        adapter = sp.create_method(base, method, labels=SIX_WAY.labels, num_virtual_tokens=4, seed=0)
        config = TrainConfig(progress=False, checkpoint_every=0, eval_every=0, steps=15, lr=0.1, batch_size=12,
                             warmup_ratio=0)
        curve = [p["loss"] for p in train(base, adapter, six_way_examples(), SIX_WAY, config).record["curve"]
                 if p["loss"] is not None]
        falls.append(curve[0] - min(curve[-3:]))
    fp32_fall, nf4_fall = falls
    assert fp32_fall > 0.5
    assert nf4_fall > 0.5 * fp32_fall, falls


@pytest.mark.slow
def test_bitsandbytes_hub_kernel_warning_is_quieted():
    """bitsandbytes, imported by transformers whenever installed, warns at import on an AVX512-BF16 CPU (this
    machine's) that a kernel could be fetched from the Hugging Face hub: nothing a user of an offline CPU can act on,
    printed before every command on such a machine (`compare --model gemma.gguf`). ``softprompts`` quiets it."""
    import logging
    import subprocess
    import sys

    code = "import softprompts, bitsandbytes, logging; print(logging.getLogger('bitsandbytes.backends.cpu.ops').level)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "kernels-community" not in done.stderr and done.stdout.strip() == str(logging.ERROR)
