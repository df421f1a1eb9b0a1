"""``--model FILE.gguf`` / ``sp.load_base(FILE.gguf)``: a GGUF file loads as the embedded model does (converted once
into the cache, keyed by its sha256, with its own tokenizer and chat template), and a bad file is one clear error.

The fast tests write a tiny Llama (tests/tiny.py) as a GGUF file with the ``gguf`` package, the way llama.cpp's
converter lays it out (q/k rows permuted for its rotary layout, byte-level vocabulary, chat template); transformers
reads it back to the same logits, so the loaded base must equal the tiny model exactly. The slow test loads the
embedded SmolLM2 GGUF through ``--model``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import CHAT_TEMPLATE, make_tokenizer, tiny_model

import softprompts as sp
from softprompts.cli import main
from softprompts.data.datasets import bundled_path
from softprompts.files import file_sha256


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for a q/k projection ``[heads * D, hidden]`` (transformers reverses it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, arch: str = "llama", bos: bool = False) -> Path:
    """The tiny Llama and its byte tokenizer as one GGUF file (f32 tensors); ``bos``: the file says its tokenizer adds
    BOS (``tokenizer.ggml.add_bos_token``, as Gemma's and Llama's files do; BOS is ``<eos>``, the one special token
    the tiny vocabulary can spare)."""
    import gguf

    model, tokenizer = tiny_model("llama"), make_tokenizer()
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if len(t) > 1 else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_scores([0.0] * len(tokens))  # no merges: one token per byte, as the tiny tokenizer
    w.add_eos_token_id(vocab["<eos>"])
    w.add_pad_token_id(vocab["<pad>"])
    if bos:
        w.add_bos_token_id(vocab["<eos>"])
        w.add_add_bos_token(True)
    w.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        x = tensor.float().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            x = _permute(x, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SOFTPROMPTS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_gguf_file_loads_as_the_model_it_holds_converted_once(tmp_path, cache, capsys):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    base = sp.load_base(str(path))
    want, tokenizer = tiny_model("llama"), make_tokenizer()
    ids = torch.tensor([tokenizer("hello world<eos>")["input_ids"]])
    assert base.tokenize("hello world<eos>") == ids[0].tolist()
    assert torch.equal(base.model(input_ids=ids).logits, want(input_ids=ids).logits)
    assert base.tokenizer.chat_template == CHAT_TEMPLATE and base.name == str(path)
    assert (cache / "models" / f"gguf-{file_sha256(path)[:16]}-v1" / "config.json").is_file()
    assert capsys.readouterr().out.count("converting") == 1
    shutil.copy(path, tmp_path / "same-bytes.gguf")  # the same bytes under another name: the same copy, no conversion
    sp.load_base(str(tmp_path / "same-bytes.gguf"))
    assert "converting" not in capsys.readouterr().out and len(list((cache / "models").iterdir())) == 1


def test_a_gguf_file_is_hashed_once_per_process(tmp_path, cache, monkeypatch):
    """Every ``resolve`` of a GGUF file (the load, then each PEFT run or LoRA trial of a compare) finds its copy by
    the file's sha256: read once while the file stays the same, again once it changes."""
    from softprompts.model import embedded

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    reads = []
    monkeypatch.setattr(embedded, "file_sha256", lambda p: reads.append(p) or file_sha256(p))
    embedded._digest.cache_clear()
    first = embedded.gguf_dir(str(path))
    assert embedded.gguf_dir(str(path)) == first and len(reads) == 1
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: read again (the same bytes, copy)
    assert embedded.gguf_dir(str(path)) == first and len(reads) == 2


def test_every_command_takes_a_gguf_file(tmp_path, cache, capsys):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = bundled_path("uci_sentiment", "train")
    task = ["--template", r"Review: {text}\nSentiment:", "--target", " {label}"]
    assert main(["eval", "--model", str(path), "--data", str(data), *task, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n"] > 0
    assert main(["train", "--model", str(path), "--data", str(data), *task, "--steps", "1", "--virtual-tokens", "2",
                 "--max-prompt-tokens", "64", "--eval-every", "0", "--no-progress",
                 "--out", str(tmp_path / "adapter")]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter.json").read_text())["base_model"]["name"] == str(path)
    capsys.readouterr()
    # its recorded base is the file: generate loads it again (from the converted copy)
    assert main(["generate", "--adapter", str(tmp_path / "adapter"), "--max-new-tokens", "2", "great"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_bad_gguf_files_are_clear_errors(tmp_path, cache, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    write_tiny_gguf(tmp_path / "odd.gguf", arch="notanarch")
    cases = [(tmp_path / "missing.gguf", "no such file"), (text, "not a GGUF file"),
             (tmp_path / "odd.gguf", "transformers cannot load this GGUF file")]
    for path, message in cases:
        with pytest.raises(sp.SoftpromptsError, match=message):
            sp.load_base(str(path))
    data = bundled_path("uci_sentiment", "train")
    task = ["--template", "{text}", "--target", " {label}"]
    assert main(["eval", "--model", str(text), "--data", str(data), *task]) == 2
    err = capsys.readouterr().err
    assert "not a GGUF file" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_embedded_gguf_file_through_model(tmp_path, cache):
    """SmolLM2's own GGUF file as ``--model``: the same weights as the embedded default, and it answers."""
    from softprompts.model.embedded import gguf_path

    base = sp.load_base(str(gguf_path()))
    ids = torch.tensor([base.tokenize("The capital of France is")])
    embedded = sp.load_base("smollm2-135m")
    assert torch.equal(base.model(input_ids=ids).logits, embedded.model(input_ids=ids).logits)
    assert "Paris" in str(sp.generate(base, "The capital of France is", max_new_tokens=8))
