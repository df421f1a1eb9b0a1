"""The decode loop for encoder-decoder bases: rows that join and leave between steps, as ``decode.DecodeBatch`` does
for decoder-only ones (the same interface, so the server's scheduler runs either).

``add(requests)`` encodes the new prompts once and prefills the decoder's start token; the new rows form groups of
one artifact kind and virtual length (``encoder_decoder.groups_by_length``: the positions count the prefix, so only
such rows share an exact batch). Every ``step()`` chooses each row's next token from its logits (greedy, or its own
seeded generator), lets the rows that end leave at once (their encoder state and both caches are cut down to the
rows that remain) and runs one decoder position per group::

    group g: encoder hidden [b_g, W_g, d], decoder self cache [b_g, H, L_g, D], cross cache [b_g, H, Pk + W_g, D]

Groups that arrived at different steps decode side by side, one forward each (their caches differ in encoder width
and decoded length); rows that arrive together share one. A row ends on a stop token (excluded from its output; the
model's EOS unless the request names others), when its ``stop_check`` says so, after ``max_new_tokens``, or when
``cancel`` removes it. Each row's tokens equal the request alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from softprompts.model.encoder_decoder import (
    DecoderState,
    EncoderState,
    decode,
    decode_more,
    encode,
    groups_by_length,
)
from softprompts.model.encoder_decoder_score import right_pad
from softprompts.model.generation import (
    ContextLengthError,
    GenerationRequest,
    GenerationResult,
    choose_next,
    eos_ids,
    record_token,
)
from softprompts.model.inject import VirtualContext


def check_request(base, request: GenerationRequest) -> None:
    """The encoder reads virtual + prompt tokens, the decoder virtual + new tokens: each within the context."""
    limit = base.context_limit
    virtual = request.artifact.length if request.artifact is not None else 0
    if request.max_new_tokens < 0:
        raise ContextLengthError(f"max_new_tokens must be >= 0, got {request.max_new_tokens}")
    if not request.prompt_ids:
        raise ContextLengthError("the prompt must have at least one token")
    sides = (("prompt", len(request.prompt_ids)), ("max_tokens", request.max_new_tokens))
    for what, tokens in sides:
        if tokens + virtual > limit:
            raise ContextLengthError(f"this model's context limit is {limit} tokens; the {what} side needs "
                                     f"{tokens + virtual} ({virtual} virtual + {tokens} {what}): lower it")


@dataclass
class _Group:
    """Rows prefilled together: their requests, results, generators and the decoder state they continue from."""

    requests: list[GenerationRequest]
    results: list[GenerationResult]
    state: DecoderState  # logits [b, 1, V]: each row's next token is still to choose
    started: float
    generators: list[torch.Generator | None] = field(default_factory=list)

    def keep(self, rows: list[int]) -> None:
        """Cut the group down to ``rows`` (encoder state, masks, both caches)."""
        if len(rows) == len(self.requests):
            return
        self.requests = [self.requests[r] for r in rows]
        self.results = [self.results[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        if not rows:
            return
        index = torch.tensor(rows, device=self.state.logits.device)
        cache = self.state.cache
        for layer in [*cache.self_attention_cache.layers, *cache.cross_attention_cache.layers]:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        enc = self.state.encoder
        encoder = EncoderState(enc.hidden[index], enc.mask[index], enc.cross_mask[index])
        self.state = DecoderState(self.state.logits[index], cache, self.state.attention_mask[index], encoder)


def _generator(request: GenerationRequest) -> torch.Generator | None:
    sampling = request.sampling
    if sampling.temperature == 0 or sampling.seed is None:
        return None
    return torch.Generator().manual_seed(int(sampling.seed))


class EncoderDecoderBatch:
    """Rows decoding together on an encoder-decoder base; ``on_finish(request, result)`` is called as each ends."""

    prefills_in_chunks = False  # the encoder reads a prompt whole (a bidirectional pass has no chunks)

    def __init__(self, base, stop_default: frozenset[int] | None = None,
                 on_finish: Callable[[GenerationRequest, GenerationResult], None] | None = None) -> None:
        self.base = base
        self.eos = frozenset(eos_ids(base)) if stop_default is None else stop_default
        self.on_finish = on_finish or (lambda request, result: None)
        self.groups: list[_Group] = []

    @property
    def requests(self) -> list[GenerationRequest]:
        return [r for g in self.groups for r in g.requests]

    def __len__(self) -> int:
        return sum(len(g.requests) for g in self.groups)

    def cache_length(self) -> int:
        """The longest row's cached positions (decoder self-attention + cross-attention)."""
        return max((int(g.state.attention_mask.shape[1]) + int(g.state.encoder.hidden.shape[1])
                    for g in self.groups), default=0)

    def can_join(self, length: int) -> bool:
        return True  # a new group never needs the running ones' shapes

    @torch.no_grad()
    def add(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Encode ``requests`` and prefill their decoders; returns their results (filled as they decode)."""
        for request in requests:
            check_request(self.base, request)
        results = [GenerationResult(tokens=[], finish_reason="length", prompt_tokens=len(r.prompt_ids))
                   for r in requests]
        for request, result in zip(requests, results, strict=True):
            if request.max_new_tokens == 0:
                self.on_finish(request, result)
        live = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
        for group in groups_by_length([requests[i].artifact for i in live]):
            rows = [live[i] for i in group]
            self.groups.append(self._prefill([requests[i] for i in rows], [results[i] for i in rows]))
        return results

    def _prefill(self, requests: list[GenerationRequest], results: list[GenerationResult]) -> _Group:
        base, started = self.base, time.perf_counter()
        ctx = VirtualContext.from_rows([r.artifact for r in requests])
        ids, mask = right_pad([r.prompt_ids for r in requests], base.pad_id, base.device)
        encoder = encode(base, ctx, ids, mask, base.layout)
        start = torch.full((len(requests), 1), base.decoder_start_id, dtype=torch.long, device=base.device)
        state = decode(base, ctx, encoder, start, None, base.layout, use_cache=True)
        return _Group(requests, results, state, started, [_generator(r) for r in requests])

    @torch.no_grad()
    def step(self) -> None:
        """Choose every row's next token, let the rows that end leave, decode one position for the others."""
        for group in list(self.groups):
            chosen = self._choose(group)
            group.keep([row for row, token in enumerate(chosen) if token is not None])
            if not group.requests:
                self.groups.remove(group)
                continue
            tokens = torch.tensor([t for t in chosen if t is not None], device=self.base.device)[:, None]
            group.state = decode_more(self.base, group.state, tokens)

    def _choose(self, group: _Group) -> list[int | None]:
        """Each row's next token, or ``None`` for a row that ended (its result finished)."""
        logits = group.state.logits[:, -1]  # [b, V]
        now = time.perf_counter()
        out: list[int | None] = []
        for row, (req, res) in enumerate(zip(group.requests, group.results, strict=True)):
            token = int(choose_next(logits[row : row + 1], req.sampling, group.generators[row])[0])
            reason = record_token(req, res, logits[row : row + 1], token, self.eos, now, group.started)
            if reason is not None:
                res.finish_reason = reason
                self.on_finish(req, res)
            out.append(token if reason is None else None)
        return out

    @torch.no_grad()
    def cancel(self, drop: Callable[[GenerationRequest], bool], reason: str = "cancelled") -> None:
        """Remove the rows whose request ``drop`` names (between steps)."""
        for group in list(self.groups):
            keep = []
            for row, (req, res) in enumerate(zip(group.requests, group.results, strict=True)):
                if drop(req):
                    res.finish_reason = reason
                    self.on_finish(req, res)
                else:
                    keep.append(row)
            group.keep(keep)
            if not group.requests:
                self.groups.remove(group)


__all__ = ["EncoderDecoderBatch", "check_request"]
