"""THE decode loop (no HF ``generate``): injected prefill, then one token per row per step from the KV cache.

A ``DecodeBatch`` holds rows decoding together, each with its own prompt ``[T_i]``, artifact (soft prompt, KV prefix
or ``None``, of any virtual length ``P_i``), sampling parameters and stop rules::

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
batch to the end (evaluation, ``generate_ids``). One loop for both. The cache appends in place (``kv_cache.py``:
no copy of the whole cache per step).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from softprompts.model.artifacts import Artifact
from softprompts.model.chunked_prefill import ChunkedPrefill
from softprompts.model.encoder_decoder import EncoderDecoderError
from softprompts.model.encoder_decoder_batch import EncoderDecoderBatch
from softprompts.model.generation import (
    GREEDY,
    GenerationRequest,
    GenerationResult,
    Sampling,
    check_request,
    choose_next,
    eos_ids,
    left_pad,
    record_token,
)
from softprompts.model.inject import Prefill, VirtualContext, decode_step, forward
from softprompts.model.kv_cache import GrowingLayer, grow_in_place, is_full_attention, merged_layer
from softprompts.model.probe import new_cache


def _generator(sampling: Sampling) -> torch.Generator | None:
    if sampling.temperature == 0 or sampling.seed is None:
        return None
    return torch.Generator().manual_seed(int(sampling.seed))


def _left_pad_to(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class DecodeBatch:
    """Rows decoding together; ``on_finish(request, result)`` is called as each one ends."""

    prefills_in_chunks = True  # a long prompt may join through a ChunkedPrefill

    def __init__(self, base, stop_default: frozenset[int] | None = None,
                 on_finish: Callable[[GenerationRequest, GenerationResult], None] | None = None) -> None:
        if base.is_encoder_decoder:
            raise EncoderDecoderError(f"{base.name} is an encoder-decoder model: its rows decode in an "
                                      "EncoderDecoderBatch (decode.new_batch picks the loop for a base)")
        self.base = base
        self.eos = frozenset(eos_ids(base)) if stop_default is None else stop_default
        self.on_finish = on_finish or (lambda request, result: None)
        self.requests: list[GenerationRequest] = []  # one per row of `state`
        self.results: list[GenerationResult] = []
        self.generators: list[torch.Generator | None] = []
        self.started: list[float] = []
        self.state: Prefill | None = None  # logits [B, 1, V]: the next token of every row is still to choose

    def __len__(self) -> int:
        return len(self.requests)

    def cache_length(self) -> int:
        """Positions every row's cache spans now (virtual + prompt + generated + left padding)."""
        return 0 if self.state is None else int(self.state.attention_mask.shape[1])

    # -- joining --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Prefill ``requests`` and make them rows of this batch; returns their results (filled as they decode)."""
        results = [GenerationResult(tokens=[], finish_reason="length", prompt_tokens=len(r.prompt_ids))
                   for r in requests]
        for req in requests:
            check_request(self.base, req)
        fresh = [(r, res) for r, res in zip(requests, results, strict=True) if r.max_new_tokens > 0]
        for req, res in zip(requests, results, strict=True):
            if req.max_new_tokens == 0:
                self.on_finish(req, res)
        if not fresh:
            return results
        started = time.perf_counter()
        ids, mask = left_pad([r.prompt_ids for r, _ in fresh], self.base.pad_id, self.base.device)  # [b, T]
        ctx = VirtualContext.from_rows([r.artifact for r, _ in fresh])
        last = torch.tensor([ids.shape[1] - 1], device=self.base.device)  # left padding: every row ends here
        state = forward(self.base, ctx, ids, mask, use_cache=True, logits_positions=last)  # logits [b, 1, V]
        self._append(fresh, state, started)
        return results

    @torch.no_grad()
    def join(self, prefill: ChunkedPrefill) -> GenerationResult:
        """Make a finished ``ChunkedPrefill`` a row of this batch; returns its result."""
        if prefill.request.max_new_tokens == 0:
            self.on_finish(prefill.request, prefill.result)
        else:
            self._append([(prefill.request, prefill.result)], prefill.state, prefill.started)
        return prefill.result

    def _append(self, rows: list[tuple[GenerationRequest, GenerationResult]], state: Prefill, started: float) -> None:
        self.state = state if self.state is None else self._merge(self.state, state)
        grow_in_place(self.state.cache)  # decode steps append in place (model/kv_cache.py)
        for req, res in rows:
            self.requests.append(req)
            self.results.append(res)
            self.generators.append(_generator(req.sampling))
            self.started.append(started)

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
    @torch.no_grad()
    def step(self) -> None:
        """Choose every row's next token, let the rows that end leave, decode one position for the others."""
        if not self.requests:
            return
        logits = self.state.logits[:, -1]  # [B, V]
        next_ids = logits.argmax(-1)
        for row, (req, gen) in enumerate(zip(self.requests, self.generators, strict=True)):
            if req.sampling.temperature > 0:
                next_ids[row] = choose_next(logits[row : row + 1], req.sampling, gen)[0]
        now = time.perf_counter()
        keep = []
        for row, tok in enumerate(next_ids.tolist()):
            req, res = self.requests[row], self.results[row]
            reason = record_token(req, res, logits[row : row + 1], tok, self.eos, now, self.started[row])
            if reason is None:
                keep.append(row)
            else:
                res.finish_reason = reason
                self.on_finish(req, res)
        if len(keep) < len(next_ids):
            next_ids = next_ids[torch.tensor(keep, dtype=torch.long, device=next_ids.device)]
        self._keep(keep)
        if self.requests:
            self.state = decode_step(self.base, self.state, next_ids)

    @torch.no_grad()
    def cancel(self, drop: Callable[[GenerationRequest], bool], reason: str = "cancelled") -> None:
        """Remove the rows whose request ``drop`` names (between steps)."""
        keep = [row for row, req in enumerate(self.requests) if not drop(req)]
        for row, req in enumerate(self.requests):
            if row not in keep:
                self.results[row].finish_reason = reason
                self.on_finish(req, self.results[row])
        self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.requests):
            return
        self.requests = [self.requests[r] for r in rows]
        self.results = [self.results[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        self.started = [self.started[r] for r in rows]
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


def new_batch(base, stop_default: frozenset[int] | None = None,
              on_finish: Callable[[GenerationRequest, GenerationResult], None] | None = None,
              ) -> DecodeBatch | EncoderDecoderBatch:
    """The decode loop for ``base``: ``DecodeBatch``, or ``EncoderDecoderBatch`` on an encoder-decoder base (the same
    interface: ``add``, ``step``, ``cancel``, ``requests``)."""
    kind = EncoderDecoderBatch if base.is_encoder_decoder else DecodeBatch
    return kind(base, stop_default, on_finish)


@torch.no_grad()
def decode_batch(base, requests: list[GenerationRequest], stop_default: frozenset[int] | None = None,
                 ) -> list[GenerationResult]:
    """Decode every request in ONE batch to the end; ``stop_default``: the stop ids of requests that name none
    (default: the model's EOS, ``eos_ids``)."""
    batch = new_batch(base, stop_default)
    results = batch.add(requests)
    while len(batch):
        batch.step()
    return results


def generate_ids(
    base,
    prompts: list[list[int]],
    artifacts: list[Artifact | None] | Artifact | None = None,
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    stop_ids: set[int] | None = None,
) -> list[list[int]]:
    """New token ids per row (stop tokens excluded), all rows in one batch. ``artifacts``: one for all rows, or one
    per row; ``stop_ids``: default the model's EOS (an empty set: never stop early)."""
    if not isinstance(artifacts, list):
        artifacts = [artifacts] * len(prompts)
    stops = frozenset(stop_ids) if stop_ids is not None else None
    requests = [GenerationRequest(list(p), a, max_new_tokens, sampling, stops)
                for p, a in zip(prompts, artifacts, strict=True)]
    return [result.tokens for result in decode_batch(base, requests)]


__all__ = ["DecodeBatch", "decode_batch", "generate_ids", "new_batch"]
