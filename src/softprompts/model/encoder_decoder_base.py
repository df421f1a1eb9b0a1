"""A frozen encoder-decoder base (``AutoModelForSeq2SeqLM``: T5, BART families) with its probed KV layout.

Shapes are measured, as for decoder-only models: one forward of ``[1, 2]`` encoder and decoder tokens with every
encoder self-attention handed an empty cache (``encoder_decoder.encoder_prefix(..., capture=)``) reads, per
layer, the key/value heads ``H_l`` and head dim ``D_l`` of the encoder's self-attention, the decoder's
self-attention and its cross-attention, in the ``KVLayout`` order (``encoder_decoder.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from softprompts.model.artifacts import KVPrefix, SoftPrompt
from softprompts.model.base import BaseModel, freeze
from softprompts.model.encoder_decoder import (
    EncoderDecoderError,
    KVLayout,
    encoder_layer_count,
    encoder_prefix,
)
from softprompts.model.probe import ModelShapes, cache_keyword


def _layer_shapes(layers) -> tuple[list[int], list[int]]:
    return [int(layer.keys.shape[1]) for layer in layers], [int(layer.keys.shape[-1]) for layer in layers]


@dataclass
class EncoderDecoderBase(BaseModel):
    """``BaseModel`` for an encoder-decoder LM: the encoder reads the prompt, the decoder writes the target.

    ``layout``: how a KV prefix's layers split into encoder self, decoder self and cross-attention parts;
    ``decoder_start_id``: the token every decoder input starts with (the model's ``decoder_start_token_id``).
    Training and scoring use HF's own head (``plain_head`` is false: T5 scales tied logits).
    """

    is_encoder_decoder: ClassVar[bool] = True
    layout: KVLayout = field(init=False)

    def __post_init__(self) -> None:
        freeze(self.model)
        self.cache_keyword = cache_keyword(self.model)
        self.plain_head = False
        self.shapes, self.layout = probe_encoder_decoder(self)

    @property
    def decoder_start_id(self) -> int:
        for source in (self.model.generation_config, self.model.config):
            start = getattr(source, "decoder_start_token_id", None)
            if start is not None:
                return int(start)
        return self.pad_id

    @property
    def context_limit(self) -> int:
        """Encoder positions (virtual + prompt tokens): BART's ``max_position_embeddings``; T5's relative positions
        have no hard limit, its ``n_positions`` (512) is what it was trained at."""
        return super().context_limit

    def soft_prompt_to_kv(self, prompt: SoftPrompt) -> KVPrefix:
        raise EncoderDecoderError(
            "a soft prompt in front of a bidirectional encoder has no input-independent KV: every encoder state "
            "depends on the whole input; soft prompts run as they are on encoder-decoder models")

    @torch.no_grad()
    def text_to_kv(self, ids: list[int] | torch.Tensor) -> KVPrefix:
        """The KV a text leaves in each part: the encoder's self-attention reading it, the decoder's self-attention
        reading it (over the encoder's output of the same text) and the cross-attention keys/values of that output.
        Each part has ``len(ids)`` positions (the real-text start of prefix tuning, ``methods/init.py``)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)[None]  # [1, P]
        encoder_caches, dec_self, cross = run_with_caches(self, ids, ids)
        layers = [c.layers[-1] for c in encoder_caches]  # each holds its own layer index only
        layers += list(dec_self.layers) + list(cross.layers)
        return KVPrefix([layer.keys[0].clone() for layer in layers], [layer.values[0].clone() for layer in layers])


def run_with_caches(base, encoder_ids: torch.Tensor, decoder_ids: torch.Tensor):
    """One cached forward: ``(encoder per-layer caches, decoder self-attention cache, cross-attention cache)``."""
    captured: list = []
    with encoder_prefix(base.model, None, capture=captured):
        out = base.model(input_ids=encoder_ids, decoder_input_ids=decoder_ids, use_cache=True)
    cache = getattr(out, base.cache_keyword)
    return captured, cache.self_attention_cache, cache.cross_attention_cache


@torch.no_grad()
def probe_encoder_decoder(base: EncoderDecoderBase) -> tuple[ModelShapes, KVLayout]:
    """``ModelShapes`` whose per-layer heads/dims follow the ``KVLayout`` order, and the layout."""
    model = base.model
    ids = torch.zeros(1, 2, dtype=torch.long, device=base.device)
    encoder, dec_self, cross = run_with_caches(base, ids, ids)
    enc_layers = [c.layers[-1] for c in encoder]
    if len(enc_layers) != encoder_layer_count(model) or len(dec_self.layers) != len(cross.layers):
        raise EncoderDecoderError(f"{type(model).__name__}: the probe saw {len(enc_layers)} encoder, "
                                  f"{len(dec_self.layers)} decoder and {len(cross.layers)} cross-attention layers")
    heads, dims = [], []
    for part in (enc_layers, dec_self.layers, cross.layers):
        h, d = _layer_shapes(part)
        heads += h
        dims += d
    layout = KVLayout(len(enc_layers), len(dec_self.layers))
    embeddings = model.get_input_embeddings().weight
    shapes = ModelShapes(
        model_type=str(model.config.model_type), num_layers=layout.total, hidden_size=int(embeddings.shape[1]),
        vocab_size=int(embeddings.shape[0]), kv_heads=tuple(heads), head_dims=tuple(dims),
        dtype=str(embeddings.dtype).removeprefix("torch."), encoder_layers=layout.encoder_layers)
    return shapes, layout


__all__ = ["EncoderDecoderBase", "probe_encoder_decoder", "run_with_caches"]
