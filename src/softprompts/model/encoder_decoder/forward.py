"""THE injection point for encoder-decoder models (T5, BART families): where each artifact goes in the model.

A ``KVPrefix`` on an encoder-decoder base has ``Le + 2 * Ld`` layers (``ModelShapes.encoder_layers = Le``; decoder
layers ``Ld``), in this order (Li & Liang, 2021: a prefix at every attention of both stacks)::

    0 .. Le-1               encoder self-attention    keys/values [H_l, P, D_l] in front of the encoder's own
    Le .. Le+Ld-1           decoder self-attention    in front of the target's, as if P tokens had been decoded
    Le+Ld .. Le+2Ld-1       decoder cross-attention   in front of the keys/values of the encoder's output

A ``SoftPrompt [P, d]`` goes in front of the encoder input (Lester et al., 2021). Embedding offsets (``OffsetPrompt``,
DePT, whose original setting is T5) are added to the encoder input's first ``S`` real tokens: the encoder reads only
the prompt, so every real token there is prompt; the decoder's tokens never get one.

What the model sees for an encoder input ``x [B, S]`` and a decoder input ``y [B, T]`` (masks ``1`` = token)::

    encoder inputs_embeds : per row [soft_b (its own p_b slots); e(x_b) + offsets; padding] [B, Ps + S, d]
    encoder self-attention: keys [K_enc (Pk slots); W_k h], mask [kv_mask; enc_mask]          [B, 1, 1, Pk + Ps + S]
    decoder self-attention: cache pre-filled with K_dec, mask [kv_mask; dec_mask]             [B, Pk + T]
    cross-attention       : cache pre-filled with K_cross, then HF appends W_k enc_out;
                            mask [kv_mask; enc_mask]                                          [B, 1, 1, Pk + Ps + S]

Encoder rows are packed (each row's soft prompt, then its tokens, then padding), so a row's content sits at positions
``0..`` whatever else is in the batch: absolute positions (BART) and relative ones (T5) equal the row alone.

transformers' encoders take no cache. A forward pre-hook on each encoder self-attention module hands it a one-layer
``DynamicCache`` holding that layer's prefix, for one call (``encoder_prefix``); the module's own ``cache.update``
puts the prefix in front of its keys and values. The decoder's two prefixes go through the model's own
``EncoderDecoderCache`` (its ``is_updated`` flags reset, so HF still appends the encoder output's keys/values
after the cross-attention prefix on the first decoder call).

Positions: the decoder counts the prefix (BART's learned positions and T5's relative bias read the cache length), as
it would for decoded text, so a decoder self-attention prefix taken from a real decoder prefill equals that text in
front of the target. T5's encoder bias counts it too (relative, from the cache length); BART's encoder positions
come from the input length and do not. Those positions are shared by the batch: rows whose prefix lengths differ
are exact in separate batches (``groups_by_length``), masks alone hide the slots of shorter prefixes.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from softprompts.errors import SoftpromptsError
from softprompts.model.artifacts import VirtualContext


class EncoderDecoderError(SoftpromptsError):
    """An encoder-decoder model whose attention we cannot reach."""


def _cache_keyword(module: nn.Module) -> str | None:
    params = inspect.signature(module.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def encoder_attentions(model) -> list[nn.Module]:
    """The encoder's self-attention modules in layer order: the innermost modules whose forward takes a cache.

    ``EncoderDecoderError`` naming the model family when their number is not the encoder's layer count (an encoder
    built another way would otherwise get its prefix silently ignored)."""
    encoder = model.get_encoder()
    takes_cache = [m for m in encoder.modules() if m is not encoder and _cache_keyword(m)]
    inner = [m for m in takes_cache if not any(c is not m and _cache_keyword(c) for c in m.modules())]
    layers = encoder_layer_count(model)
    if len(inner) != layers or any(getattr(m, "layer_idx", None) is None for m in inner):
        raise EncoderDecoderError(
            f"cannot inject into the encoder of {type(model).__name__} ({model.config.model_type}): found {len(inner)} "
            f"self-attention modules taking a cache for its {layers} layers; the T5 and BART families are supported")
    return inner


def encoder_layer_count(model) -> int:
    config = model.config
    for key in ("encoder_layers", "num_layers", "num_hidden_layers"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    raise EncoderDecoderError(f"{type(model).__name__}: its config names no encoder layer count")


@contextlib.contextmanager
def encoder_prefix(model, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None,
                   capture: list | None = None) -> Iterator[None]:
    """During the block, encoder self-attention ``l`` sees ``prefix[l]`` (keys, values ``[B, H, P, D]``) in front of
    its own keys and values. ``capture``: a list that receives each layer's cache after the call (probing, the KV
    a text leaves in the encoder), with or without a prefix."""
    modules = encoder_attentions(model)
    handles = []
    for i, module in enumerate(modules):
        keyword = _cache_keyword(module)
        layer = module.layer_idx

        def hook(mod, args, kwargs, i=i, keyword=keyword, layer=layer):
            cache = DynamicCache()
            if prefix is not None:
                keys, values = prefix[i]
                cache.update(keys, values, layer)
            if capture is not None:
                capture.append(cache)
            return args, {**kwargs, keyword: cache}

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, K]`` (1 = attend) -> ``[B, 1, 1, K]`` additive float mask (0 or the dtype's minimum): transformers passes
    a 4-D mask through as is, to eager and SDPA attention alike, broadcast over heads and queries."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@dataclass(frozen=True)
class KVLayout:
    """How a KV prefix's layers split into the encoder self, decoder self and cross-attention parts."""

    encoder_layers: int
    decoder_layers: int

    @property
    def total(self) -> int:
        return self.encoder_layers + 2 * self.decoder_layers

    def split(self, layers: list) -> tuple[list, list, list]:
        if len(layers) != self.total:
            raise ValueError(f"a KV prefix for this model has {self.total} layers "
                             f"({self.encoder_layers} encoder + 2 x {self.decoder_layers} decoder), got {len(layers)}")
        e, d = self.encoder_layers, self.decoder_layers
        return layers[:e], layers[e : e + d], layers[e + d :]


def pack_encoder_rows(embeds: torch.Tensor, mask: torch.Tensor, ctx: VirtualContext,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``[soft_b valid slots; embeds_b valid tokens; padding]``: ``embeds [B, S, d]`` with ``mask [B, S]``
    (any padding side) -> ``(inputs_embeds [B, Ps + S, d], mask [B, Ps + S])``, content first in every row."""
    if ctx.soft is not None:
        embeds = torch.cat([ctx.soft.to(dtype), embeds], dim=1)
        mask = torch.cat([ctx.soft_mask, mask], dim=1)
    order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices  # valid columns first, in order
    packed = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
    return packed, mask.gather(1, order)


def decoder_cache(ctx: VirtualContext, layout: KVLayout, dtype: torch.dtype) -> EncoderDecoderCache:
    """An ``EncoderDecoderCache`` holding the context's decoder self and cross-attention prefixes (empty without)."""
    self_cache, cross_cache = DynamicCache(), DynamicCache()
    if ctx.kv is not None:
        _, dec, cross = layout.split(ctx.kv)
        for layer, (keys, values) in enumerate(dec):
            self_cache.update(keys.to(dtype), values.to(dtype), layer)
        for layer, (keys, values) in enumerate(cross):
            cross_cache.update(keys.to(dtype), values.to(dtype), layer)
    cache = EncoderDecoderCache(self_cache, cross_cache)
    cache.is_updated = dict.fromkeys(range(layout.decoder_layers), False)  # HF must still add the encoder's K/V
    return cache


@dataclass
class EncoderState:
    """The encoder's output for a batch and what the decoder attends with."""

    hidden: torch.Tensor  # [B, W, d] packed rows
    mask: torch.Tensor  # [B, W]
    cross_mask: torch.Tensor  # [B, W] or, with a cross-attention prefix, [B, 1, 1, Pk + W] additive (part_mask)


def encode(base, ctx: VirtualContext, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
           layout: KVLayout) -> EncoderState:
    """Run the encoder on ``input_ids [B, S]`` with the soft prompt in front and the encoder prefix injected."""
    model = base.model
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    dtype = base.dtype
    embeds = ctx.offset_embeds(model.get_input_embeddings()(input_ids), attention_mask)  # [B, S, d]
    embeds, mask = pack_encoder_rows(embeds, attention_mask.long(), ctx, dtype)
    if ctx.kv is None:
        hidden = model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return EncoderState(hidden, mask, mask)
    enc, _, cross = layout.split(ctx.kv)
    with encoder_prefix(model, [(k.to(dtype), v.to(dtype)) for k, v in enc] if enc[0][0].shape[2] else None):
        hidden = model.get_encoder()(inputs_embeds=embeds, attention_mask=part_mask(ctx, enc, mask, dtype))
    return EncoderState(hidden.last_hidden_state, mask, part_mask(ctx, cross, mask, dtype))


def part_mask(ctx: VirtualContext, part: list, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The encoder-side mask of one prefix part: ``[B, 1, 1, P_part + W]`` additive over [its slots; the tokens].
    A part's slots are the first ``P_part`` of ``kv_mask`` (parts of one ``KVPrefix`` all have ``Pk``; a part of
    length 0 leaves the tokens' own mask, as without a prefix)."""
    width = int(part[0][0].shape[2]) if part else 0
    if width == 0:
        return mask
    return additive_mask(torch.cat([ctx.kv_mask[:, :width], mask], dim=1), dtype)


@dataclass
class DecoderState:
    """After a decoder call: the logits of its positions and what the next call continues from."""

    logits: torch.Tensor  # [B, T, V]
    cache: EncoderDecoderCache | None
    attention_mask: torch.Tensor  # [B, Pk + T]: the decoder self-attention mask so far
    encoder: EncoderState


def decode(base, ctx: VirtualContext, encoder: EncoderState, decoder_ids: torch.Tensor,
           decoder_mask: torch.Tensor | None, layout: KVLayout, use_cache: bool = False) -> DecoderState:
    """The decoder on ``decoder_ids [B, T]`` (right padded; ``decoder_mask``) over ``encoder``, prefixes injected."""
    if decoder_mask is None:
        decoder_mask = torch.ones_like(decoder_ids)
    decoder_mask = decoder_mask.long()
    cache = None
    if ctx.kv is not None or use_cache:
        cache = decoder_cache(ctx, layout, base.dtype)
    if ctx.kv is not None:
        width = int(layout.split(ctx.kv)[1][0][0].shape[2]) if layout.decoder_layers else 0
        decoder_mask = torch.cat([ctx.kv_mask[:, :width], decoder_mask], dim=1)
    passed = {base.cache_keyword: cache} if cache is not None else {}
    out = base.model(encoder_outputs=(encoder.hidden,), attention_mask=encoder.cross_mask,
                     decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask,
                     use_cache=use_cache or cache is not None, **passed)
    return DecoderState(out.logits, getattr(out, base.cache_keyword) if use_cache else None, decoder_mask, encoder)


def decode_more(base, state: DecoderState, ids: torch.Tensor) -> DecoderState:
    """Feed ``ids [B, t]`` (no padding) into the decoder cache of ``state``; logits ``[B, t, V]``."""
    mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(ids.shape)], dim=1)
    out = base.model(encoder_outputs=(state.encoder.hidden,), attention_mask=state.encoder.cross_mask,
                     decoder_input_ids=ids, decoder_attention_mask=mask, use_cache=True,
                     **{base.cache_keyword: state.cache})
    return DecoderState(out.logits, getattr(out, base.cache_keyword), mask, state.encoder)


def forward(base, ctx: VirtualContext, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            decoder_ids: torch.Tensor, decoder_mask: torch.Tensor | None, use_cache: bool = False) -> DecoderState:
    """Encoder then decoder with ``ctx`` injected: logits ``[B, T, V]`` over the decoder positions."""
    layout = base.layout
    encoder = encode(base, ctx, input_ids, attention_mask, layout)
    return decode(base, ctx, encoder, decoder_ids, decoder_mask, layout, use_cache)


def groups_by_length(ctx_rows: list) -> list[list[int]]:
    """Row indices grouped by (artifact kind, virtual length): the rows one exact batch may hold (module docstring)."""
    groups: dict[tuple, list[int]] = {}
    for i, artifact in enumerate(ctx_rows):
        key = (None, 0) if artifact is None else (artifact.kind, artifact.length)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


__all__ = ["DecoderState", "EncoderDecoderError", "EncoderState", "KVLayout", "additive_mask", "decode",
           "decode_more", "decoder_cache", "encode", "encoder_attentions", "encoder_prefix", "forward",
           "groups_by_length", "pack_encoder_rows"]
