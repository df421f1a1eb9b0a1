"""Tiny random models of real architectures (built from configs, no downloads), a byte-level tokenizer, and the
helpers many test files share: seeded perturbed methods, decoding a batch the way the engine does, calls run in
threads at once."""

from __future__ import annotations

import functools
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    T5Config,
)

import softprompts as sp
from softprompts.model.decode_loop import decode_batch
from softprompts.model.decoder.base import BaseModel
from softprompts.model.encoder_decoder.base import EncoderDecoderBase

SPECIALS = ["<pad>", "<eos>"]
VOCAB = 256 + len(SPECIALS)
# a chat template over the byte tokens (role headers are plain text) that ends every turn with <eos>
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<eos>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per UTF-8 byte, plus <pad> and <eos>; a chat template."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # a set: sort for fixed ids
    for i, tok in enumerate(SPECIALS):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

CONFIGS = {
    # Llama with grouped-query attention (4 query heads share 2 KV heads), RoPE
    "llama": lambda: LlamaConfig(**COMMON, num_key_value_heads=2, max_position_embeddings=256),
    # Qwen2: GQA + q/k/v biases
    "qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=1, max_position_embeddings=256),
    # GPT-2: learned absolute positions, fused c_attn, no RoPE
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256),
    # Gemma3: scaled embeddings, q/k norms, head_dim != hidden/heads, sliding-window layers mixed with global ones
    "gemma3": lambda: Gemma3TextConfig(
        **COMMON,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
    ),
}
ARCHS = list(CONFIGS)  # decoder-only


_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
           relative_attention_num_buckets=8, pad_token_id=256, eos_token_id=257, decoder_start_token_id=256)
SEQ2SEQ_CONFIGS = {
    # T5 v1: relative position bias (no position ids), tied head with the d_model**-0.5 logit scale
    "t5": lambda: T5Config(**_T5),
    # T5 v1.1 / flan-T5 style: gated-GELU feed-forward, untied head, 3 decoder layers over 2 encoder layers
    "t5-gated": lambda: T5Config(**{**_T5, "num_decoder_layers": 3}, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False),
    # BART: learned absolute positions (offset 2) in both stacks, scaled embeddings, biases, layer norms
    "bart": lambda: BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, max_position_embeddings=256, pad_token_id=256, eos_token_id=257,
                               bos_token_id=257, decoder_start_token_id=257, forced_eos_token_id=None,
                               scale_embedding=True),
}
SEQ2SEQ_ARCHS = list(SEQ2SEQ_CONFIGS)  # encoder-decoder
ALL_ARCHS = ARCHS + SEQ2SEQ_ARCHS


def tiny_model(arch: str, seed: int = 0):
    """A tiny random model of ``arch`` (``ARCHS`` or ``SEQ2SEQ_ARCHS``)."""
    torch.manual_seed(seed)
    if arch in SEQ2SEQ_CONFIGS:
        return scaled_up(AutoModelForSeq2SeqLM.from_config(SEQ2SEQ_CONFIGS[arch](), dtype=torch.float32))
    config = CONFIGS[arch]()
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 256, 257, 257
    return scaled_up(AutoModelForCausalLM.from_config(config, dtype=torch.float32))


def scaled_up(model):
    """Random init of some archs is tiny: matrices drawn again with std 0.2 so prefixes visibly matter."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


def tiny_base(arch: str, seed: int = 0) -> BaseModel:
    """A fresh tiny base of either family (``ARCHS``: ``BaseModel``; ``SEQ2SEQ_ARCHS``: ``EncoderDecoderBase``), or
    ``ARCH-QUANTIZATION`` (``QUANTIZED_ARCHS``): that model loaded quantized."""
    if arch in QUANTIZED_ARCHS:
        return quantized_base(arch, seed)
    kind = EncoderDecoderBase if arch in SEQ2SEQ_CONFIGS else BaseModel
    return kind(model=tiny_model(arch, seed), tokenizer=make_tokenizer(), name=f"tiny-{arch}")


# tiny models loaded with --quantize (both families, both backends)
QUANTIZED_ARCHS = ["llama-nf4", "llama-int8", "t5-nf4"]
QUANTIZED_DECODERS = [a for a in QUANTIZED_ARCHS if a.split("-")[0] in CONFIGS]


def quantized_base(name: str, seed: int = 0):
    """``tiny_model(ARCH, seed)`` saved and loaded back with ``load_base(..., quantize=QUANTIZATION)``."""
    arch, quantization = name.rsplit("-", 1)
    with tempfile.TemporaryDirectory(prefix=f"tiny-{name}-") as directory:
        save_tiny(arch, directory, seed)
        base = sp.load_base(directory, quantize=quantization)
    base.name = f"tiny-{name}"
    return base


@functools.cache
def cached_base(arch: str) -> BaseModel:
    """``tiny_base(arch)`` built once per session and shared by every test file (a frozen base: tests never change
    it; a test that does builds its own with ``tiny_base``)."""
    return tiny_base(arch)


def perturb(method, scale=0.5, seed=1):
    """A method's parameters moved by seeded noise (its artifact then differs from its init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.float().std().item() or 1.0))
    return method


def perturbed(base, method: str, n: int, init_text: str, scale: float = 0.5, seed: int = 1):
    """``method`` with ``n`` virtual tokens started from ``init_text``, then ``perturb``-ed (not its init)."""
    return perturb(sp.create_method(base, method, num_virtual_tokens=n, init_text=init_text), scale, seed)


def decode_alone(engine, requests: list) -> list:
    """The requests decoded in one batch with the engine's stop ids, under its model lock (a scheduler may be
    running on the same model): the reference "alone" answer serving is checked against."""
    with engine.lock:
        return decode_batch(engine.base, requests, engine.eos_ids)


def concurrently(calls: list[Callable[[], object]], stagger_s: float = 0.0,
                 while_running: Callable[[], object] | None = None) -> list:
    """Run every call in a thread of its own, all at once (call ``i`` waits ``i * stagger_s`` first), and
    ``while_running()`` meanwhile; each call's result, in order. A call that raised raises here."""
    results, errors = [None] * len(calls), []

    def run(i, call):
        try:
            time.sleep(i * stagger_s)
            results[i] = call()
        except BaseException as err:  # handed to the caller's thread below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    try:
        if while_running is not None:
            while_running()
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return results


def save_tiny(arch: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny model + tokenizer directory loadable with ``load_base(path)``."""
    directory = Path(directory)
    tiny_model(arch, seed).save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


BOS = "<bos>"
BOS_ID = VOCAB  # one token past the byte tokenizer's vocabulary: BOS bases have VOCAB + 1 rows
# CHAT_TEMPLATE preceded by the BOS token, as Gemma's and Llama 3's templates write it
BOS_CHAT_TEMPLATE = "{{ bos_token }}" + CHAT_TEMPLATE


def make_bos_tokenizer(chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """``make_tokenizer``'s bytes plus ``<bos>`` (id ``BOS_ID``), which it puts in front of every text it encodes
    with special tokens (``add_bos_token=True``, as Gemma's and Llama's tokenizers do)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for i, tok in enumerate([*SPECIALS, BOS]):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token=BOS,
                                        add_bos_token=True)
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_bos_base(arch: str = "llama", seed: int = 0, chat_template: str = CHAT_TEMPLATE) -> BaseModel:
    """A tiny decoder-only base (``ARCHS``) whose tokenizer adds BOS (``make_bos_tokenizer``), its vocabulary one
    row larger for it."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config.vocab_size = VOCAB + 1
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 256, 257, BOS_ID
    model = scaled_up(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    return BaseModel(model=model, tokenizer=make_bos_tokenizer(chat_template), name=f"tiny-bos-{arch}")


def saved_table(path: Path, base, adapters: dict):
    """A prompt table holding ``adapters`` (name -> Adapter), saved at ``path``, read back and attached to ``base``:
    what a server loads."""
    from softprompts.table import PromptTable

    table = PromptTable.load(path, create=True)
    for name, adapter in adapters.items():
        table.add(name, adapter)
    table.save()
    table = PromptTable.load(path, base)
    table.attach(base)
    return table
