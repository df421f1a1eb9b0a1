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
    want = evaluate(base, adapter, examples, sp.TaskSpec.from_json(adapter.task))
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
