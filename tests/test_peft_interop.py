"""PEFT interop, checked against PEFT itself: our export loads in PEFT with the same logits, PEFT adapters (trained
with PEFT's own modules) import to the same logits, and malformed or unsupported PEFT directories give clear errors.

Every equivalence test also asserts that the adapter changes the logits, so a silently ignored prompt or prefix
cannot make it pass. Conventions measured here: unpadded / right-padded batches agree exactly; with left padding PEFT
matches ours for prefixes only when given ``position_ids = attention_mask.cumsum(-1) - 1``, and never for soft
prompts (PEFT drops position ids there).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import cached_base, perturbed, save_tiny, tiny_model

import softprompts as sp
from softprompts.cli import main
from softprompts.errors import SoftpromptsError
from softprompts.interop import PeftImportError, export_peft, import_peft, read_peft, to_peft
from softprompts.interop.peft_export import PeftExportError
from softprompts.model.decoder.inject import forward

peft = pytest.importorskip("peft")

ATOL = 1e-5
METHODS = ["prompt", "ptuning", "prefix", "deep"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5.24 deprecates `past_key_values`, which PEFT passes
        yield


def batch(base, padding: str = "right"):
    """Two rows of different lengths: ``ids [2, T]``, ``mask [2, T]`` padded on the given side."""
    rows = [base.tokenize("hello there"), base.tokenize("hi you")]
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        pad = width - len(r)
        ids.append(r + [256] * pad if padding == "right" else [256] * pad + r)
        mask.append([1] * len(r) + [0] * pad if padding == "right" else [0] * pad + [1] * len(r))
    return torch.tensor(ids), torch.tensor(mask)


def trained_adapter(base, method: str, seed: int = 1) -> sp.Adapter:
    """An adapter with clearly non-initial values (perturbed parameters), materialized."""
    return sp.Adapter.from_method(perturbed(base, method, 5, "abcde", seed=seed), base,
                                  task={"task": "generate", "prompt": "{text}", "target": " {label}"})


def peft_logits(model, ids, mask, num_virtual: int, soft: bool, **kwargs) -> torch.Tensor:
    """PEFT's logits for the real tokens (PEFT returns the soft prompt's positions too)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    return logits[:, num_virtual:] if soft else logits


def assert_real_close(a, b, mask, atol=ATOL):
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=atol, rtol=1e-5)


def assert_changes(base, logits, ids, mask):
    with torch.no_grad():
        plain = base.model(input_ids=ids, attention_mask=mask).logits
    assert (plain - logits)[mask.bool()].abs().max() > 1e-2, "the adapter does not change the output"


# ---- export -> PEFT -------------------------------------------------------------------------------------------
@pytest.mark.injection  # PEFT's prefix path depends on the transformers version: runs on both
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("method", METHODS)
def test_export_loads_in_peft_with_same_logits(tmp_path, arch, method):
    base = cached_base(arch)
    adapter = trained_adapter(base, method)
    out = export_peft(adapter, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    soft = adapter.artifact.kind == "soft_prompt"
    assert config["peft_type"] == ("PROMPT_TUNING" if soft else "PREFIX_TUNING")
    model = peft.PeftModel.from_pretrained(tiny_model(arch), str(out)).eval()
    for padding in ("right", "left"):
        ids, mask = batch(base, padding)
        ours = forward(base, adapter.artifact, ids, mask).logits
        if padding == "left" and soft:
            continue  # PEFT ignores position ids with soft prompts: see test_left_padding_conventions
        kwargs = {"position_ids": (mask.cumsum(1) - 1).clamp(min=0)} if padding == "left" else {}
        theirs = peft_logits(model, ids, mask, adapter.num_virtual_tokens, soft, **kwargs)
        assert_real_close(ours, theirs, mask)
        assert_changes(base, theirs, ids, mask)


def test_export_gqa_layout(tmp_path):
    """Tiny llama has 4 query heads and 2 KV heads: PEFT's GQA convention is num_attention_heads = KV heads."""
    base = cached_base("llama")
    adapter = trained_adapter(base, "deep")
    config, tensors = to_peft(adapter)
    heads, dim = base.shapes.kv_heads[0], base.shapes.head_dims[0]
    assert (config["num_attention_heads"], config["token_dim"]) == (heads, heads * dim) == (2, 16)
    rows = tensors["prompt_embeddings"]
    assert tuple(rows.shape) == (5, base.shapes.num_layers * 2 * heads * dim)
    # PEFT's own reading: view(P, 2L, H, D); row 2l = keys of layer l, 2l + 1 = values
    view = rows.view(5, 2 * base.shapes.num_layers, heads, dim)
    torch.testing.assert_close(view[:, 2].permute(1, 0, 2), adapter.artifact.keys[1], rtol=0, atol=0)
    torch.testing.assert_close(view[:, 3].permute(1, 0, 2), adapter.artifact.values[1], rtol=0, atol=0)


@pytest.mark.injection  # PEFT's prefix path depends on the transformers version: runs on both
def test_left_padding_conventions(tmp_path):
    """Measured PEFT behaviour with left padding (documented in README and peft_export)."""
    base = cached_base("llama")
    ids, mask = batch(base, "left")
    for method, soft in (("prompt", True), ("prefix", False)):
        adapter = trained_adapter(base, method)
        model = peft.PeftModel.from_pretrained(tiny_model("llama"), str(export_peft(adapter, tmp_path / method)))
        ours = forward(base, adapter.artifact, ids, mask).logits
        slot_positions = peft_logits(model, ids, mask, 5, soft)  # no position_ids: pads take positions
        assert (ours - slot_positions)[mask.bool()].abs().max() > 1e-3
        if not soft:  # PEFT adds P to the position ids it is given: the HF convention gives ours exactly
            given = peft_logits(model, ids, mask, 5, soft, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
            assert_real_close(ours, given, mask)


def test_export_refuses_per_layer_head_sizes():
    base = cached_base("llama")
    adapter = trained_adapter(base, "deep")
    art = adapter.artifact
    adapter.artifact = sp.KVPrefix([art.keys[0], art.keys[1][:1]], [art.values[0], art.values[1][:1]])
    with pytest.raises(PeftExportError, match="same key/value heads"):
        to_peft(adapter)


def test_export_refuses_existing_output(tmp_path):
    adapter = trained_adapter(cached_base("llama"), "prompt")
    export_peft(adapter, tmp_path / "out")
    with pytest.raises(FileExistsError):
        export_peft(adapter, tmp_path / "out")
    export_peft(adapter, tmp_path / "out", overwrite=True)


# ---- PEFT-trained -> import ------------------------------------------------------------------------------------
def peft_configs():
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return {
        "prompt": lambda: peft.PromptTuningConfig(**common),
        "ptuning-mlp": lambda: peft.PromptEncoderConfig(**common, encoder_hidden_size=16),
        "ptuning-lstm": lambda: peft.PromptEncoderConfig(
            **common, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
        ),
        "prefix": lambda: peft.PrefixTuningConfig(**common),
        "prefix-projection": lambda: peft.PrefixTuningConfig(**common, prefix_projection=True, encoder_hidden_size=16),
    }


def peft_trained(arch: str, kind: str, directory, steps: int = 2):
    """A PEFT adapter trained by PEFT's own modules (random values + a few SGD steps), saved with save_pretrained."""
    torch.manual_seed(3)
    model = peft.get_peft_model(tiny_model(arch), peft_configs()[kind]())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.tensor([list(b"training text")])
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(str(directory))
    return model


@pytest.mark.injection  # PEFT's prefix path depends on the transformers version: runs on both
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma3"])
@pytest.mark.parametrize("kind", ["prompt", "ptuning-mlp", "ptuning-lstm", "prefix", "prefix-projection"])
def test_peft_trained_adapter_imports_with_same_logits(tmp_path, arch, kind):
    if arch in ("qwen2", "gemma3") and kind in ("ptuning-lstm", "prefix-projection"):
        pytest.skip("covered on llama/gpt2; keeps the matrix fast")
    base = cached_base(arch)
    trained = peft_trained(arch, kind, tmp_path / "peft")
    adapter = import_peft(tmp_path / "peft", base)
    soft = adapter.artifact.kind == "soft_prompt"
    assert adapter.method == {"prompt": "prompt", "ptuning": "ptuning", "prefix": "prefix"}[kind.split("-")[0]]
    ids, mask = batch(base, "right")
    ours = forward(base, adapter.artifact, ids, mask).logits
    reloaded = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path / "peft")).eval()
    for model in (reloaded, trained):  # what PEFT users load, and the training-time model with its encoders
        theirs = peft_logits(model, ids, mask, 4, soft)
        assert_real_close(ours, theirs, mask, atol=1e-4)
    assert_changes(base, ours, ids, mask)
    if not soft:
        assert [k.shape[0] for k in adapter.artifact.keys] == list(base.shapes.kv_heads)


def test_export_import_round_trip_keeps_method_and_task(tmp_path):
    base = cached_base("llama")
    for method in METHODS:
        adapter = trained_adapter(base, method)
        back = import_peft(export_peft(adapter, tmp_path / method), base)
        assert (back.method, back.task, back.method_config) == (adapter.method, adapter.task, adapter.method_config)
        for name, t in adapter.artifact.tensors().items():
            assert torch.equal(t, back.artifact.tensors()[name])


def test_cli_import_and_export(tmp_path, capsys):
    model_dir = save_tiny("llama", tmp_path / "model")
    base = sp.load_base(str(model_dir))
    peft_trained("llama", "prefix", tmp_path / "peft")
    assert main(["import", "--peft", str(tmp_path / "peft"), "--out", str(tmp_path / "ours"),
                 "--model", str(model_dir)]) == 0
    adapter = sp.load_adapter(tmp_path / "ours", base)
    assert adapter.base_name == str(model_dir) and adapter.artifact.kind == "kv_prefix"
    reloaded = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "peft")).eval()
    ids, mask = batch(base)
    assert_real_close(forward(base, adapter.artifact, ids, mask).logits, peft_logits(reloaded, ids, mask, 4, False),
                      mask, atol=1e-4)
    assert main(["export", "--adapter", str(tmp_path / "ours"), "--format", "peft", "--out", str(tmp_path / "x")]) == 0
    assert "PREFIX_TUNING" in capsys.readouterr().out
    exported = load_file(str(tmp_path / "x" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(exported, load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))["prompt_embeddings"])


# ---- encoder-decoder: SEQ_2_SEQ_LM soft prompts in front of the encoder ------------------------------------------
@pytest.mark.injection
@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_seq2seq_soft_prompt_export_loads_in_peft_and_imports_back(tmp_path, arch, method):
    from softprompts.model.encoder_decoder.forward import forward as seq2seq_forward

    base = cached_base(arch)
    adapter = trained_adapter(base, method)
    out = export_peft(adapter, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["task_type"], config["num_transformer_submodules"]) == ("SEQ_2_SEQ_LM", 1)
    model = peft.PeftModel.from_pretrained(tiny_model(arch), str(out)).eval()
    ids, mask = batch(base, "right")
    decoder = torch.tensor([[base.decoder_start_id, 5, 6]] * 2)
    ours = seq2seq_forward(base, sp.VirtualContext.broadcast(adapter.artifact, 2), ids, mask, decoder, None).logits
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        plain = base.model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-5)
    assert (plain - theirs).abs().max() > 1e-2
    back = import_peft(out, base)
    assert torch.equal(back.artifact.embeds, adapter.artifact.embeds)
    with pytest.raises(PeftImportError, match="base model is an encoder-decoder"):
        import_peft(export_peft(trained_adapter(cached_base("llama"), method), tmp_path / "causal"), base)


def test_seq2seq_prefix_export_is_refused():
    with pytest.raises(PeftExportError, match="decoder only"):
        to_peft(trained_adapter(cached_base("t5"), "prefix"))


# ---- malformed and unsupported PEFT directories ----------------------------------------------------------------
def write_peft(directory, config: dict, tensors: dict | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


PROMPT = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "token_dim": 32}


@pytest.mark.parametrize(
    "config, tensors, match",
    [
        ({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8}, {"x": torch.zeros(2, 2)}, "not weight adapters"),
        ({**PROMPT, "peft_type": "SOMETHING_NEW"}, {"prompt_embeddings": torch.zeros(3, 32)}, "not supported"),
        ({**PROMPT, "peft_type": "MULTITASK_PROMPT_TUNING"}, {"prompt_embeddings": torch.zeros(3, 32)},
         "not supported"),
        ({**PROMPT, "task_type": "SEQ_2_SEQ_LM", "num_transformer_submodules": 2},
         {"prompt_embeddings": torch.zeros(6, 32)}, "encoder only"),
        ({**PROMPT, "task_type": "SEQ_2_SEQ_LM", "num_transformer_submodules": 1},
         {"prompt_embeddings": torch.zeros(3, 32)}, "base model is decoder-only"),
        ({**PROMPT, "task_type": "SEQ_2_SEQ_LM", "peft_type": "PREFIX_TUNING", "num_transformer_submodules": 1},
         {"prompt_embeddings": torch.zeros(3, 32)}, "decoder only"),
        (PROMPT, {"prompt_embeddings": torch.zeros(3, 48)}, "hidden size 32"),
        (PROMPT, {"prompt_embeddings": torch.zeros(4, 32)}, "num_virtual_tokens is 3"),
        (PROMPT, {"embedding.weight": torch.zeros(3, 32)}, "not 'prompt_embeddings'"),
        (PROMPT, {"prompt_embeddings": torch.zeros(3, 32, 1)}, "2-D"),
        ({**PROMPT, "peft_type": "PREFIX_TUNING", "num_layers": 3, "num_attention_heads": 2, "token_dim": 16},
         {"prompt_embeddings": torch.zeros(3, 96)}, "num_layers is 3"),
        ({**PROMPT, "peft_type": "PREFIX_TUNING", "num_layers": 2, "num_attention_heads": 2, "token_dim": 16},
         {"prompt_embeddings": torch.zeros(3, 60)}, "config and tensor disagree"),
        ({**PROMPT, "peft_type": "PREFIX_TUNING", "num_layers": 2, "num_attention_heads": 1, "token_dim": 8},
         {"prompt_embeddings": torch.zeros(3, 32)}, "2 key/value heads"),
    ],
)
def test_bad_peft_directories(tmp_path, config, tensors, match):
    directory = write_peft(tmp_path / "bad", config, tensors)
    with pytest.raises(PeftImportError, match=match):
        import_peft(directory, cached_base("llama"))


def test_missing_files_and_bad_json(tmp_path):
    base = cached_base("llama")
    with pytest.raises(PeftImportError, match="not a directory"):
        read_peft(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftImportError, match="adapter_config.json is missing"):
        read_peft(tmp_path / "empty")
    bin_only = write_peft(tmp_path / "bin", PROMPT)
    (bin_only / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(PeftImportError, match="never loaded"):
        import_peft(bin_only, base)
    bad = write_peft(tmp_path / "json", PROMPT, {"prompt_embeddings": torch.zeros(3, 32)})
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(PeftImportError, match="not valid JSON"):
        read_peft(bad)
    truncated = write_peft(tmp_path / "trunc", PROMPT, {"prompt_embeddings": torch.zeros(3, 32)})
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PeftImportError, match="truncated or corrupted"):
        read_peft(truncated)


def test_real_lora_directory_is_refused_by_the_cli(tmp_path, capsys):
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(task_type="CAUSAL_LM", r=2,
                                                                   target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path / "lora"))
    assert issubclass(PeftImportError, SoftpromptsError)
    code = main(["import", "--peft", str(tmp_path / "lora"), "--out", str(tmp_path / "out"), "--model", "unused"])
    assert code == 2
    err = capsys.readouterr().err
    assert "LORA" in err and "not weight adapters" in err
    assert not (tmp_path / "out").exists()
