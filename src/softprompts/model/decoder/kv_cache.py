"""A decoding cache that appends in place: each full-attention layer keeps its keys and values in buffers with room to
grow, instead of concatenating the whole cache with the new position at every step.

HF's ``DynamicLayer.update`` does ``keys = cat([keys, new])``: every decode step copies every layer's entire cache,
``O(B x H x L x D)`` bytes per layer per step; at batch 64 on SmolLM2 that copy is a third of the step
(``benchmarks/decode_step.py --profile 64``). ``GrowingLayer`` holds buffers ``[B, H, C, D]`` with ``C >= L`` and
exposes ``keys``/``values`` as the views ``[:, :, :L]``; an append writes ``[:, :, L:L+n]`` and only when ``C`` is
full are the buffers reallocated, ``C' = L + n + max(64, L / 4)`` (amortized O(1) copies per appended position, at
most 25 % + 64 positions of unused room). Attention reads the view: the same values as the concatenated tensor, so
decoding is unchanged (``tests/test_scheduler.py`` compares against HF ``generate``'s tokens and our logits alone).

Only decoding uses it (``grow_in_place`` converts a prefill's cache); training keeps HF's cache, whose
concatenation autograd differentiates. Sliding-window layers stay as they are (they drop old positions).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 64  # positions of headroom added at least on every reallocation


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values [B, H, L, D]`` are views of preallocated buffers ``[B, H, C, D]``."""

    def __init__(self, **kwargs) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0
        super().__init__(**kwargs)

    # HF code (and ours) reads and assigns `keys` / `values`: an assigned tensor becomes the buffer, no headroom
    @property
    def keys(self) -> torch.Tensor | None:
        return self._k if self._k is None or self._k.dim() != 4 else self._k[:, :, : self._len]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._k = tensor
        self._len = int(tensor.shape[-2]) if tensor is not None and tensor.dim() == 4 else 0

    @property
    def values(self) -> torch.Tensor | None:
        return self._v if self._v is None or self._v.dim() != 4 else self._v[:, :, : self._len]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._v = tensor

    @property
    def capacity(self) -> int:
        return int(self._k.shape[-2]) if self._k is not None and self._k.dim() == 4 else 0

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` in all (copies the used part once)."""
        if positions <= self.capacity:
            return
        keys, values = self.keys, self.values
        shape = list(keys.shape)
        shape[-2] = positions
        self._k, self._v = keys.new_empty(shape), values.new_empty(shape)
        self._k[:, :, : self._len] = keys
        self._v[:, :, : self._len] = values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._k is None or self._k.dim() != 4:  # the first states: they are the buffer
            self.keys, self.values = key_states, value_states
            return self.keys, self.values
        end = self._len + int(key_states.shape[-2])
        if end > self.capacity:
            self.reserve(end + max(MIN_ROOM, self._len // 4))
        self._k[:, :, self._len : end] = key_states
        self._v[:, :, self._len : end] = value_states
        self._len = end
        return self.keys, self.values

    def drop_front(self, positions: int) -> None:
        """Forget the first ``positions`` (columns no row attends to any more), keeping the headroom (a view)."""
        self._k, self._v = self._k[:, :, positions:], self._v[:, :, positions:]
        self._len -= positions

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (and the headroom)."""
        if self._len > 0:
            length = self._len
            self._k, self._v = self._k[indices, ...], self._v[indices, ...]
            self._len = length


def stack_rows(parts: list[torch.Tensor], room: int = MIN_ROOM) -> torch.Tensor:
    """States ``[B_i, H, L_i, D]`` -> one buffer ``[sum B_i, H, max L_i + room, D]``, each part's positions ending at
    column ``max L_i`` (left padding: zeros, which the attention mask hides), written once."""
    span = max(int(t.shape[-2]) for t in parts)
    first = parts[0]
    out = first.new_zeros((sum(int(t.shape[0]) for t in parts), first.shape[1], span + room, first.shape[-1]))
    row = 0
    for t in parts:
        out[row : row + t.shape[0], :, span - t.shape[-2] : span] = t
        row += int(t.shape[0])
    return out


def merged_layer(layers: list, room: int = MIN_ROOM) -> GrowingLayer:
    """One ``GrowingLayer`` holding the rows of ``layers`` (full-attention layers) one after the other, left-padded
    to the longest: a single copy into a buffer with ``room`` (the concatenate-then-grow path copies twice)."""
    keys = [layer.keys for layer in layers]
    merged = GrowingLayer()
    merged.lazy_initialization(keys[0], layers[0].values)
    merged._k, merged._v = stack_rows(keys, room), stack_rows([layer.values for layer in layers], room)
    merged._len = max(int(k.shape[-2]) for k in keys)
    return merged


def is_full_attention(layer) -> bool:
    """A layer that keeps every position (HF's plain ``DynamicLayer`` or ours), not a sliding window."""
    return type(layer) in (DynamicLayer, GrowingLayer)


def grow_in_place(cache, room: int = MIN_ROOM) -> None:
    """Turn every plain ``DynamicLayer`` of ``cache`` into a ``GrowingLayer`` holding the same states, with ``room``
    positions to append before the first reallocation."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys is None or layer.keys.dim() != 4:
            continue
        grown = GrowingLayer()
        grown.lazy_initialization(layer.keys, layer.values)
        grown.keys, grown.values = layer.keys, layer.values
        grown.reserve(grown._len + room)
        cache.layers[index] = grown


__all__ = ["GrowingLayer", "grow_in_place", "is_full_attention", "merged_layer", "stack_rows"]
