"""THE decode loop (no HF ``generate``): injected prefill, then one token per row per step from the KV cache.

A ``DecodeBatch`` (the decoder-only family's ``decode_loop.RowBatch``) holds rows decoding together, each with its
own prompt ``[T_i]``, artifact (soft prompt, KV prefix or ``None``, of any virtual length ``P_i``), sampling parameters
and stop rules::

    add(requests) : left-padded prefill [b, T] with VirtualContext.from_rows(artifacts) -> logits [b, V]; the new rows
                    join the running ones (caches and masks left-padded to one length, concatenated on the batch)
    step()        : one token per row from its logits; rows that end leave; the rest decode one position
                    ([B, H_l, L + 1, D_l] per layer)

A row ends on a stop token (excluded from its output; the model's EOS unless the request names others), when its
``stop_check`` says so (stop strings live there), after ``max_new_tokens``, or when ``cancel`` removes it (a client
that left). Each row's tokens equal that request run alone, whatever joins or leaves around it: masking hides other
rows' virtual slots and padding, every row keeps its own positions (real tokens start at its own ``P_i``, see
``inject.py``), and a sampled row draws from its own generator seeded with its request's seed.

This is what continuous batching needs (the server's scheduler adds arrivals between steps); ``decode_batch`` runs one
batch to the end (evaluation, ``generate_ids``; both in ``decode_loop.py``, for every family). One loop for both. The
cache appends in place (``kv_cache.py``: no copy of the whole cache per step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from softprompts.model.artifacts import VirtualContext
from softprompts.model.decode_loop import Row, RowBatch
from softprompts.model.decoder.chunked_prefill import ChunkedPrefill
from softprompts.model.decoder.inject import Prefill, decode_step, forward
from softprompts.model.decoder.kv_cache import GrowingLayer, grow_in_place, is_full_attention, merged_layer
from softprompts.model.generation import GenerationRequest, GenerationResult
from softprompts.model.padding import pad_rows
from softprompts.model.probe import new_cache


def _left_pad_to(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class DecodeBatch(RowBatch):
    """Rows of a decoder-only base decoding together in one cache (``RowBatch`` keeps the rows)."""

    prefills_in_chunks = True  # a long prompt may join through a ChunkedPrefill

    def __init__(self, base, stop_default: frozenset[int] | None = None,
                 on_finish: Callable[[GenerationRequest, GenerationResult], None] | None = None,
                 prefill_chunk: int | None = None) -> None:
        super().__init__(base, stop_default, on_finish, prefill_chunk)
        self.state: Prefill | None = None  # logits [B, 1, V]: the next token of every row is still to choose

    def cache_length(self) -> int:
        """Positions every row's cache spans now (virtual + prompt + generated + left padding)."""
        return 0 if self.state is None else int(self.state.attention_mask.shape[1])

    # -- joining --------------------------------------------------------------------------------------------------
    def _prefill(self, rows: list[Row]) -> list[Row]:
        """Left-padded prefill ``[b, T]`` of ``rows`` with ``VirtualContext.from_rows``; they join the running ones."""
        ids, mask = pad_rows([r.prompt_ids for r, _ in rows], self.base.pad_id, self.base.device)  # [b, T]
        ctx = VirtualContext.from_rows([r.artifact for r, _ in rows])
        last = torch.tensor([ids.shape[1] - 1], device=self.base.device)  # left padding: every row ends here
        self._take(forward(self.base, ctx, ids, mask, use_cache=True, logits_positions=last))  # logits [b, 1, V]
        return rows

    def _chunked_prefill(self, request: GenerationRequest, result: GenerationResult) -> ChunkedPrefill:
        return ChunkedPrefill(self.base, request, self.prefill_chunk, result)

    def _join_prefilled(self, prefill: ChunkedPrefill) -> None:
        self._take(prefill.state)

    def _take(self, state: Prefill) -> None:
        self.state = state if self.state is None else self._merge(self.state, state)
        grow_in_place(self.state.cache)  # decode steps append in place (kv_cache.py)

    def can_join(self, length: int) -> bool:
        """Whether rows whose prefill spans ``length`` positions can join (a sliding-window layer that already
        dropped positions cannot be aligned with new rows: they wait until this batch ends)."""
        if self.state is None:
            return True
        longest = max(self.cache_length(), length)
        for layer in self.state.cache.layers:
            window = getattr(layer, "sliding_window", None)
            if window is not None and longest >= window - 1:
                return False
        return True

    def _merge(self, a: Prefill, b: Prefill) -> Prefill:
        """Rows of ``a`` then rows of ``b``: caches and masks left-padded to one length (padding is masked)."""
        length = max(a.attention_mask.shape[1], b.attention_mask.shape[1])
        cache = new_cache(self.base.model)
        for index, (x, y) in enumerate(zip(a.cache.layers, b.cache.layers, strict=True)):
            if is_full_attention(x) and is_full_attention(y):
                cache.layers[index] = merged_layer([x, y])  # one copy, with room to append
                continue
            span = max(x.keys.shape[-2], y.keys.shape[-2])
            keys = torch.cat([_left_pad_to(x.keys, span, 2), _left_pad_to(y.keys, span, 2)], dim=0)
            values = torch.cat([_left_pad_to(x.values, span, 2), _left_pad_to(y.values, span, 2)], dim=0)
            cache.update(keys, values, index)
        mask = torch.cat([_left_pad_to(a.attention_mask, length, 1), _left_pad_to(b.attention_mask, length, 1)])
        return Prefill(logits=torch.cat([a.logits, b.logits]), cache=cache, attention_mask=mask,
                       next_positions=torch.cat([a.next_positions, b.next_positions]))

    # -- decoding -------------------------------------------------------------------------------------------------
    def _logits(self) -> torch.Tensor:
        return self.state.logits[:, -1]  # [B, V]

    def _advance(self, tokens: torch.Tensor) -> None:
        self.state = decode_step(self.base, self.state, tokens)

    def _select(self, rows: list[int]) -> None:
        if not rows:
            self.state = None
            return
        index = torch.tensor(rows, device=self.base.device)
        for layer in self.state.cache.layers:
            layer.batch_select_indices(index)
        mask = self.state.attention_mask[index]
        self.state = Prefill(logits=self.state.logits[index], cache=self.state.cache, attention_mask=mask,
                             next_positions=self.state.next_positions[index])
        self._trim_padding()

    def _trim_padding(self) -> None:
        """Drop the leading columns no remaining row attends to (a long row left): the cache shrinks to the longest
        remaining row. Not with sliding-window layers, whose caches hold only the last window of positions."""
        mask = self.state.attention_mask
        first = int(mask.any(0).long().argmax())  # the first column some row attends to
        layers = self.state.cache.layers
        if first == 0 or any(getattr(layer, "sliding_window", None) is not None for layer in layers):
            return
        for layer in layers:
            drop = first - (mask.shape[1] - layer.keys.shape[-2])  # a layer's cache may be shorter than the mask
            if drop > 0 and isinstance(layer, GrowingLayer):
                layer.drop_front(drop)
            elif drop > 0:
                layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]
        self.state = Prefill(logits=self.state.logits, cache=self.state.cache, attention_mask=mask[:, first:],
                             next_positions=self.state.next_positions)


__all__ = ["DecodeBatch"]
