"""THE injection point: the only place where artifacts meet the model's forward.

Inputs per forward (``B`` rows, ``T`` real tokens):
  ``input_ids [B, T]``, ``attention_mask [B, T]`` (1 = token, 0 = padding; left or right padding both work),
  and a ``VirtualContext`` holding, per row, an optional KV prefix and/or soft prompt.

What the model sees::

    cache (KV prefix)   : per layer [B, H_l, Pk, D_l], slots masked by kv_mask [B, Pk]
    inputs_embeds       : cat(soft [B, Ps, hidden], embed(input_ids) [B, T, hidden])  -> [B, Ps + T, hidden]
                          (the real tokens' part with a row's embedding offsets added, when it has them)
    attention_mask      : cat(kv_mask, soft_mask, attention_mask)                      -> [B, Pk + Ps + T]

Position convention (one rule for both artifacts): a row with ``p = kv_mask.sum() + soft_mask.sum()`` valid virtual
positions puts them at ``0..p-1`` and its real tokens at ``p, p+1, ...`` (padding skipped, via the cumulative sum of
the mask). A soft prompt therefore produces exactly the KV that a prefix of the same length holds, and either can
stand in for the other. Virtual positions never carry labels (the returned logits cover real tokens only, which is
the same as label -100 there).

Embedding offsets (``OffsetPrompt``, DePT) are added to the embeddings of a row's first ``S`` real tokens by each
token's real index (``VirtualContext.offset_embeds``), never beyond the row's prompt: the caller says where each row's
prompt ends (``prompt_lengths [B]``: the training loss and scoring know it from where the target starts; ``None``:
every real token is prompt, a prefill). Decode steps never add one (generated tokens are no prompt); a prompt fed in
chunks (``extend`` with ``offsets``) continues the index where the previous chunk stopped.

The cache keyword is read from the forward signature (``cache`` on transformers >= 5.24, ``past_key_values`` before).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from softprompts.errors import SoftpromptsError
from softprompts.model.artifacts import Artifact, VirtualContext
from softprompts.model.probe import new_cache


def build_cache(model, ctx: VirtualContext, dtype: torch.dtype):
    """A fresh cache for ``model`` holding the context's KV prefix (if any)."""
    cache = new_cache(model)
    if ctx.kv is not None:
        for layer, (keys, values) in enumerate(ctx.kv):
            cache.update(keys.to(dtype), values.to(dtype), layer)
    return cache


def virtual_counts(ctx: VirtualContext, batch: int, device: torch.device) -> torch.Tensor:
    """Number of valid virtual positions per row ``[B]`` (where each row's real tokens start)."""
    count = torch.zeros(batch, dtype=torch.long, device=device)
    if ctx.kv_mask is not None:
        count = count + ctx.kv_mask.sum(1)
    if ctx.soft_mask is not None:
        count = count + ctx.soft_mask.sum(1)
    return count


@dataclass
class Prefill:
    """Result of an injected forward: logits for real tokens only and what decoding needs to continue."""

    logits: torch.Tensor  # [B, T, V] (or [B, K, V] when logits_positions selects K positions)
    cache: object | None  # the model's cache after the forward (None unless use_cache)
    attention_mask: torch.Tensor  # [B, Pk + Ps + T], to extend during decoding
    next_positions: torch.Tensor  # [B], position id of each row's next token


def _model_inputs(
    base, ctx: VirtualContext | Artifact | None, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    use_cache: bool, prompt_lengths: torch.Tensor | None = None,
) -> tuple[dict, VirtualContext, torch.Tensor, torch.Tensor]:
    """The model's keyword arguments for ``input_ids [B, T]`` with ``ctx`` injected (see the module docstring);
    ``prompt_lengths [B]``: the real tokens of each row that are prompt (embedding offsets stop there).

    Returns ``(kwargs, ctx, next_positions [B], full_mask [B, Pk + Ps + T])``.
    """
    if getattr(base, "is_encoder_decoder", False):
        raise SoftpromptsError(f"{base.name} is an encoder-decoder model: run it through model/encoder_decoder/ "
                               "(forward with encoder and decoder inputs), not the decoder-only injection")
    model = base.model
    batch = input_ids.shape[0]
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.long()
    if not isinstance(ctx, VirtualContext):
        ctx = VirtualContext.broadcast(ctx, batch)
    dtype = base.dtype

    embeds = ctx.offset_embeds(model.get_input_embeddings()(input_ids), attention_mask, prompt_lengths)  # [B, T, d]
    masks = [attention_mask]
    starts = virtual_counts(ctx, batch, device)  # [B]
    real_pos = starts[:, None] + (attention_mask.cumsum(1) - 1).clamp(min=0)  # [B, T]
    positions = [real_pos]
    if ctx.soft is not None:
        kv_count = ctx.kv_mask.sum(1) if ctx.kv_mask is not None else torch.zeros_like(starts)
        soft_pos = kv_count[:, None] + (ctx.soft_mask.cumsum(1) - 1).clamp(min=0)  # [B, Ps]
        embeds = torch.cat([ctx.soft.to(dtype), embeds], dim=1)  # [B, Ps + T, hidden]
        masks.insert(0, ctx.soft_mask)
        positions.insert(0, soft_pos)
    if ctx.kv_mask is not None:
        masks.insert(0, ctx.kv_mask)
    full_mask = torch.cat(masks, dim=1)
    kwargs = dict(inputs_embeds=embeds, attention_mask=full_mask, position_ids=torch.cat(positions, dim=1),
                  use_cache=use_cache)
    if ctx.kv is not None or use_cache:
        kwargs[base.cache_keyword] = build_cache(model, ctx, dtype)
    return kwargs, ctx, starts + attention_mask.sum(1), full_mask


def forward(
    base,
    ctx: VirtualContext | Artifact | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    use_cache: bool = False,
    logits_positions: torch.Tensor | None = None,
    prompt_lengths: torch.Tensor | None = None,
) -> Prefill:
    """Run ``base.model`` on ``input_ids [B, T]`` with the virtual context injected.

    ``logits_positions``: optional 1-D indices into the T real positions; only those are projected to the vocab
    (the LM head is the most expensive part of a step when only a few positions carry labels).
    ``prompt_lengths [B]``: real tokens per row that are prompt (``None``: all; module docstring).
    """
    kwargs, ctx, next_positions, full_mask = _model_inputs(base, ctx, input_ids, attention_mask, use_cache,
                                                           prompt_lengths)
    if logits_positions is not None:
        kwargs["logits_to_keep"] = logits_positions + ctx.soft_length
    out = base.model(**kwargs)
    logits = out.logits
    if logits_positions is None and ctx.soft_length:
        logits = logits[:, ctx.soft_length :]
    cache = getattr(out, base.cache_keyword, None) if use_cache else None
    return Prefill(logits=logits, cache=cache, attention_mask=full_mask, next_positions=next_positions)


def hidden_at(
    base, ctx: VirtualContext | Artifact | None, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    positions: torch.Tensor, prompt_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states ``[B, K, hidden]`` at the real-token columns ``positions [K]``, with ``ctx`` injected
    (``prompt_lengths [B]`` as in ``forward``).

    What the causal LM's output head projects (after the decoder's last norm): where ``BaseModel.plain_head`` holds,
    ``forward(..., logits_positions=positions).logits == output_embeddings(hidden_at(...))``.
    """
    kwargs, ctx, _, _ = _model_inputs(base, ctx, input_ids, attention_mask, use_cache=False,
                                      prompt_lengths=prompt_lengths)
    hidden = base.model.base_model(**kwargs).last_hidden_state  # [B, Ps + T, hidden]
    return hidden[:, positions + ctx.soft_length]


def extend(base, state: Prefill, ids: torch.Tensor, offsets: VirtualContext | None = None,
           first_index: int = 0) -> Prefill:
    """Feed ``ids [B, T]`` (T more real tokens per row, no padding) into the cache of ``state``; returns the logits
    of the last one ``[B, 1, V]``. A decode step is ``T = 1``; a long prompt is prefilled in chunks this way, a
    row's embedding offsets (``offsets``, its ``VirtualContext``) continuing at prompt token ``first_index``."""
    width = ids.shape[1]
    mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(ids.shape[0], width)], dim=1)
    positions = state.next_positions[:, None] + torch.arange(width, device=ids.device)[None, :]
    tokens = {"input_ids": ids}
    if offsets is not None and offsets.offsets is not None:
        embeds = base.model.get_input_embeddings()(ids)  # [B, T, hidden]
        tokens = {"inputs_embeds": offsets.offset_embeds(embeds, torch.ones_like(ids), first_index=first_index)}
    out = base.model(
        **tokens,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{base.cache_keyword: state.cache},
    )
    return Prefill(
        logits=out.logits,
        cache=getattr(out, base.cache_keyword),
        attention_mask=mask,
        next_positions=state.next_positions + width,
    )


def decode_step(base, state: Prefill, next_ids: torch.Tensor) -> Prefill:
    """Feed one token per row ``next_ids [B]`` into the cache of ``state``; returns logits ``[B, 1, V]``."""
    return extend(base, state, next_ids[:, None])


@contextmanager
def eager_attention(model):
    """``model`` runs with transformers' eager attention inside the block (softmax weights materialized, the mask a
    ``[B, 1, Q, K]`` tensor in every layer), its own implementation restored after."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def _attention_modules(model) -> dict[int, torch.nn.Module]:
    """Each layer's self-attention module by its ``layer_idx`` (Llama, Qwen2, Gemma3, GPT-2 name it so)."""
    found = {}
    for module in model.modules():
        index = getattr(module, "layer_idx", None)
        if index is not None and type(module).__name__.endswith("Attention"):
            found.setdefault(int(index), module)
    return found


@contextmanager
def hidden_columns(model, columns: tuple[int, int], layers: set[int]):
    """Inside the block, the key columns ``columns = (start, stop)`` of the attention mask (virtual positions in a
    cache laid out as ``inject`` lays it: the KV prefix first) are hidden in each layer of ``layers``: the mask gets
    the dtype's minimum there (``softmax`` weight exactly 0), so those layers attend as if the positions were absent
    while the other layers still read them. Runs with eager attention (a materialized mask in every layer)."""
    start, stop = columns

    def hide(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None:
            raise SoftpromptsError(f"{type(module).__name__} got no attention mask: cannot hide positions in it")
        mask = mask.clone()  # shared by the layers
        if mask.dtype == torch.bool:
            mask[..., start:stop] = False
        else:
            mask[..., start:stop] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    modules = _attention_modules(model)
    with eager_attention(model):
        handles = [modules[i].register_forward_pre_hook(hide, with_kwargs=True) for i in sorted(layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@torch.no_grad()
def attention_weights(base, ctx: VirtualContext | Artifact | None, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The model's own eager softmax weights per layer, ``[B, H, Ps + T, Pk + Ps + T]`` each (queries: the soft
    prompt's and the real tokens'; keys: every position), with ``ctx`` injected."""
    kwargs, _, _, _ = _model_inputs(base, ctx, input_ids, attention_mask, use_cache=False)
    with eager_attention(base.model):
        out = base.model(**kwargs, output_attentions=True)
    return list(out.attentions)
