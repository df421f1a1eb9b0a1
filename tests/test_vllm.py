"""vLLM interop without vLLM: the ``prompt_embeds`` payload, decoded the way vLLM decodes it and fed to the HF model
as ``inputs_embeds``, gives the same greedy tokens as our adapter (soft prompt first, or at the ``<|virtual|>``
marker); KV-prefix adapters are refused; ``softprompts export --format vllm`` writes what a client needs."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import perturbed, save_tiny, tiny_base

import softprompts as sp
from softprompts.cli import main
from softprompts.interop.vllm import (
    VllmExportError,
    completion_request,
    decode_prompt_embeds,
    export_vllm,
    load_soft_prompt,
    prompt_embeds,
)
from softprompts.model.decode import generate_ids
from softprompts.model.placement import place
from softprompts.tasks import split_prompt


def adapter_of(base, method="prompt", n=4):
    return sp.Adapter.from_method(perturbed(base, method, n, "vllm"[:n], seed=3), base,
                                  task={"task": "generate", "prompt": "{text}"})


@pytest.mark.parametrize("prompt", ["Review: a fine film\nSentiment:", "Classify.\n<|virtual|>Review: dull\nAnswer:"],
                         ids=["soft-prompt-first", "at-the-marker"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: a scaled embedding layer
def test_payload_gives_our_greedy_tokens(tmp_path, arch, prompt):
    base = tiny_base(arch)
    adapter = adapter_of(base)
    out = export_vllm(adapter, tmp_path / "vllm")
    soft = load_soft_prompt(out)
    assert torch.equal(soft, adapter.artifact.embeds)
    config = json.loads((out / "vllm.json").read_text())
    assert config["num_virtual_tokens"] == 4 and config["base_model"] == base.name
    body = completion_request("served-name", prompt_embeds(base.model, base.tokenizer, soft, prompt), max_tokens=8)
    embeds = decode_prompt_embeds(body["prompt_embeds"])  # what vLLM reads
    assert embeds.shape == (len(base.tokenize(prompt.replace("<|virtual|>", ""))) + 4, base.shapes.hidden_size)
    with torch.no_grad():
        hf = base.model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0],
                                 dtype=torch.long), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 pad_token_id=base.pad_id)
    lead, ids = split_prompt(base, prompt)
    ours = generate_ids(base, [ids], place(base, adapter.artifact, lead), max_new_tokens=8, stop_ids=set())[0]
    assert hf[0, -8:].tolist() == ours


def test_kv_prefix_adapters_are_refused(tmp_path):
    base = tiny_base("llama")
    with pytest.raises(VllmExportError, match="no KV-prefix input.*softprompts serve"):
        export_vllm(adapter_of(base, "prefix"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_vllm(tmp_path, capsys):
    model = save_tiny("llama", tmp_path / "model")
    base = sp.load_base(str(model))
    sp.save_adapter(adapter_of(base), tmp_path / "soft")
    sp.save_adapter(adapter_of(base, "prefix"), tmp_path / "kv")
    assert main(["export", "--adapter", str(tmp_path / "soft"), "--format", "vllm", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "soft_prompt.safetensors").is_file() and "prompt_embeds" in capsys.readouterr().out
    assert main(["export", "--adapter", str(tmp_path / "kv"), "--format", "vllm", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "no KV-prefix input" in err and "Traceback" not in err and not (tmp_path / "p").exists()
