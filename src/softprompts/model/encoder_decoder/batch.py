"""The decode loop for encoder-decoder bases: rows that join and leave between steps, as
``decoder.decode.DecodeBatch`` does for decoder-only ones (both are ``decode_loop.RowBatch``: the row bookkeeping is
written once, the scheduler drives either through ``decode_loop.DecodeLoop``).

``add(requests)`` encodes the new prompts once and prefills the decoder's start token; the new rows form groups of
one artifact kind and virtual length (``encoder_decoder.groups_by_length``: the positions count the prefix, so only
such rows share an exact batch). Every ``step()`` chooses each row's next token from its logits (greedy, or its own
seeded generator), lets the rows that end leave at once (their encoder state and both caches are cut down to the
rows that remain) and runs one decoder position per group::

    group g: encoder hidden [b_g, W_g, d], decoder self cache [b_g, H, L_g, D], cross cache [b_g, H, Pk + W_g, D]

Groups that arrived at different steps decode side by side, one forward each (their caches differ in encoder width
and decoded length); rows that arrive together share one. Rows are numbered group after group, in the order the
groups joined. Each row's tokens equal the request alone. The encoder reads a prompt whole (a bidirectional pass has
no chunks), so no prompt is prefilled in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softprompts.model.artifacts import VirtualContext
from softprompts.model.decode_loop import Row, RowBatch
from softprompts.model.encoder_decoder.forward import (
    DecoderState,
    EncoderState,
    decode,
    decode_more,
    encode,
    groups_by_length,
)
from softprompts.model.padding import pad_rows


@dataclass
class _Group:
    """Rows prefilled together (consecutive rows of the batch) and the decoder state they continue from."""

    size: int
    state: DecoderState  # logits [b, 1, V]: each row's next token is still to choose

    def keep(self, rows: list[int]) -> None:
        """Cut the group down to its local ``rows`` (encoder state, masks, both caches)."""
        if len(rows) == self.size:
            return
        self.size = len(rows)
        if not rows:
            return
        index = torch.tensor(rows, device=self.state.logits.device)
        cache = self.state.cache
        for layer in [*cache.self_attention_cache.layers, *cache.cross_attention_cache.layers]:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        enc = self.state.encoder
        encoder = EncoderState(enc.hidden[index], enc.mask[index], enc.cross_mask[index])
        self.state = DecoderState(self.state.logits[index], cache, self.state.attention_mask[index], encoder)


class EncoderDecoderBatch(RowBatch):
    """Rows decoding together on an encoder-decoder base, in groups of one artifact kind and virtual length."""

    prefills_in_chunks = False  # the encoder reads a prompt whole (a bidirectional pass has no chunks)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.groups: list[_Group] = []

    def cache_length(self) -> int:
        """The longest row's cached positions (decoder self-attention + cross-attention)."""
        return max((int(g.state.attention_mask.shape[1]) + int(g.state.encoder.hidden.shape[1])
                    for g in self.groups), default=0)

    def _prefill(self, rows: list[Row]) -> list[Row]:
        """Encode the new prompts once and prefill the decoder's start token, one group per (kind, length)."""
        ordered: list[Row] = []
        for group in groups_by_length([request.artifact for request, _ in rows]):
            members = [rows[i] for i in group]
            self.groups.append(_Group(len(members), self._prefill_group([r for r, _ in members])))
            ordered += members
        return ordered

    def _prefill_group(self, requests) -> DecoderState:
        base = self.base
        ctx = VirtualContext.from_rows([r.artifact for r in requests])
        ids, mask = pad_rows([r.prompt_ids for r in requests], base.pad_id, base.device, side="right")
        encoder = encode(base, ctx, ids, mask, base.layout)
        start = torch.full((len(requests), 1), base.decoder_start_id, dtype=torch.long, device=base.device)
        return decode(base, ctx, encoder, start, None, base.layout, use_cache=True)

    def _logits(self) -> torch.Tensor:
        return torch.cat([g.state.logits[:, -1] for g in self.groups])  # [B, V], group after group

    def _select(self, rows: list[int]) -> None:
        first = 0
        for group in self.groups:
            size = group.size
            group.keep([r - first for r in rows if first <= r < first + size])
            first += size
        self.groups = [g for g in self.groups if g.size]

    def _advance(self, tokens: torch.Tensor) -> None:
        first = 0
        for group in self.groups:
            chosen = tokens[first : first + group.size, None]  # [b, 1]
            group.state = decode_more(self.base, group.state, chosen)
            first += group.size


__all__ = ["EncoderDecoderBatch"]
