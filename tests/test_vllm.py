"""vLLM interop without vLLM: the ``prompt_embeds`` payload, decoded the way vLLM decodes it and fed to the HF model
as ``inputs_embeds``, gives the same greedy tokens as our adapter (soft prompt first, or at the ``<|virtual|>``
marker; a DePT adapter's offsets on the text after it); KV-prefix adapters are refused; ``softprompts export --format
vllm`` writes what a client needs."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import perturb, perturbed, save_tiny, tiny_base

import softprompts as sp
from softprompts.cli import main
from softprompts.interop.vllm import (
    VllmExportError,
    completion_request,
    decode_prompt_embeds,
    export_vllm,
    load_offsets,
    load_soft_prompt,
    prompt_embeds,
)
from softprompts.model.decode_loop import generate_ids
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


@pytest.mark.parametrize("prompt", ["fine", "Review: a fine film\nSentiment:", "Say.\n<|virtual|>Review: dull"],
                         ids=["shorter-than-S", "longer-than-S", "at-the-marker"])
def test_a_dept_export_gives_our_greedy_tokens(tmp_path, prompt):
    """The offsets are exported beside the soft prompt and ``prompt_embeds`` adds them: vLLM's input then gives the
    tokens of our injection (which the soft prompt alone does not)."""
    base = tiny_base("llama")
    method = sp.create_method(base, "dept", num_virtual_tokens=4, init_text="vllm", rank=3, offset_positions=8)
    adapter = sp.Adapter.from_method(perturb(method, scale=0.5, seed=3), base, task={"task": "generate"})
    out = export_vllm(adapter, tmp_path / "vllm")
    offsets = load_offsets(out)
    assert torch.equal(offsets.dense(), adapter.artifact.offsets.dense())
    assert json.loads((out / "vllm.json").read_text())["offsets"]["positions"] == 8
    lead, ids = split_prompt(base, prompt)
    ours = generate_ids(base, [ids], place(base, adapter.artifact, lead), max_new_tokens=8, stop_ids=set())[0]
    plain = generate_ids(base, [ids], place(base, adapter.artifact.prompt, lead), max_new_tokens=8, stop_ids=set())[0]
    assert ours != plain  # the offsets change the answer
    embeds = decode_prompt_embeds(completion_request(
        "m", prompt_embeds(base.model, base.tokenizer, load_soft_prompt(out), prompt, offsets))["prompt_embeds"])
    with torch.no_grad():
        hf = base.model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0],
                                 dtype=torch.long), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 pad_token_id=base.pad_id)
    assert hf[0, -8:].tolist() == ours
    assert load_offsets(export_vllm(adapter_of(base), tmp_path / "soft")) is None


def test_cli_export_vllm_names_dept_offsets(tmp_path, capsys):
    """The command's line names what it wrote: a DePT export holds its offsets beside the soft prompt."""
    model = save_tiny("llama", tmp_path / "model")
    base = sp.load_base(str(model))
    method = sp.create_method(base, "dept", num_virtual_tokens=4, init_text="vllm", rank=3, offset_positions=8)
    sp.save_adapter(sp.Adapter.from_method(perturb(method, scale=0.5, seed=3), base, task={"task": "generate"}),
                    tmp_path / "dept")
    assert main(["export", "--adapter", str(tmp_path / "dept"), "--format", "vllm", "--out", str(tmp_path / "o")]) == 0
    assert f"plus offsets [8, {base.shapes.hidden_size}]" in capsys.readouterr().out


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
