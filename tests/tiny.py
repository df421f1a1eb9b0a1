"""Tiny random models of real architectures (built from configs, no downloads) and a byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from softprompts.model.base import BaseModel

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
ARCHS = list(CONFIGS)


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 256, 257, 257
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init of some archs is tiny: scale up so prefixes visibly matter
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


def tiny_base(arch: str, seed: int = 0) -> BaseModel:
    return BaseModel(model=tiny_model(arch, seed), tokenizer=make_tokenizer(), name=f"tiny-{arch}")


def save_tiny(arch: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny model + tokenizer directory loadable with ``load_base(path)``."""
    directory = Path(directory)
    tiny_model(arch, seed).save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory
