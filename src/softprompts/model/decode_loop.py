"""The decode loop's contract (``DecodeLoop``, what the scheduler drives) and its one skeleton (``RowBatch``).

Rows decode together; each has its own prompt, artifact, sampling parameters and stop rules. The skeleton keeps the
row bookkeeping once for every model family::

    add(requests)  check each (base.check_request), finish those asking for 0 tokens, prefill the rest: together, or
                   (a family that ``prefills_in_chunks``, a prompt over ``prefill_chunk``) alone, a chunk per
                   ``advance_prefill()``, joining once its prompt is in
    step()         logits [B, V] -> each row's token (greedy, or its own generator seeded with its request's seed);
                   ``generation.record_token`` books it; rows that end leave; the rest decode one position
    cancel(drop)   rows (and prompts still prefilling) whose request ``drop`` names leave between steps

A family supplies the model side (``decoder.decode.DecodeBatch``, ``encoder_decoder.batch.EncoderDecoderBatch``):
``_prefill`` (rows -> its state), ``_logits`` (each row's next-token logits, in row order), ``_select`` (keep rows),
``_advance`` (one position per row), and ``can_join`` / ``cache_length``. Each row's tokens equal that request run
alone, whatever joins or leaves around it (the family's masking and positions make it so; tests check it).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import torch

from softprompts.model.artifacts import Artifact
from softprompts.model.generation import (
    GREEDY,
    GenerationRequest,
    GenerationResult,
    Sampling,
    choose_next,
    eos_ids,
    hold_stops,
    record_token,
)

Row = tuple[GenerationRequest, GenerationResult]


class DecodeLoop(Protocol):
    """What the server's scheduler drives (and ``decode_batch`` below runs to the end)."""

    prefills_in_chunks: bool  # a long prompt may be prefilled alone, a chunk per advance_prefill()
    prefilling: deque  # prompts being prefilled in chunks, oldest first (each has .request)

    @property
    def requests(self) -> list[GenerationRequest]: ...  # the decoding rows' requests, in row order
    def __len__(self) -> int: ...  # decoding rows (not counting those still prefilling)
    def add(self, requests: list[GenerationRequest]) -> list[GenerationResult]: ...
    def prefills_alone(self, request: GenerationRequest) -> bool: ...
    def advance_prefill(self) -> None: ...
    def step(self) -> None: ...
    def cancel(self, drop: Callable[[GenerationRequest], bool], reason: str = "cancelled") -> None: ...
    def can_join(self, length: int) -> bool: ...
    def cache_length(self) -> int: ...


def _generator(sampling: Sampling) -> torch.Generator | None:
    if sampling.temperature == 0 or sampling.seed is None:
        return None
    return torch.Generator().manual_seed(int(sampling.seed))


class RowBatch:
    """The row bookkeeping of every decode loop; ``on_finish(request, result)`` is called as each row ends."""

    prefills_in_chunks = False

    def __init__(self, base, stop_default: frozenset[int] | None = None,
                 on_finish: Callable[[GenerationRequest, GenerationResult], None] | None = None,
                 prefill_chunk: int | None = None) -> None:
        self.base = base
        self.eos = frozenset(eos_ids(base)) if stop_default is None else stop_default
        self.on_finish = on_finish or (lambda request, result: None)
        self.prefill_chunk = prefill_chunk if self.prefills_in_chunks else None
        self._requests: list[GenerationRequest] = []  # one per decoding row, in row order
        self.results: list[GenerationResult] = []
        self.generators: list[torch.Generator | None] = []
        self.started: list[float] = []
        self.prefilling: deque = deque()

    @property
    def requests(self) -> list[GenerationRequest]:
        return self._requests

    def __len__(self) -> int:
        return len(self._requests)

    # -- joining --------------------------------------------------------------------------------------------------
    def prefills_alone(self, request: GenerationRequest) -> bool:
        """Whether ``add`` prefills ``request`` alone, a chunk per ``advance_prefill`` (a prompt over one chunk)."""
        return self.prefill_chunk is not None and len(request.prompt_ids) > self.prefill_chunk

    @torch.no_grad()
    def add(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Check every request, then prefill them and make them rows; returns their results (filled as they
        decode). A request that fails its check raises before any of them joins."""
        for request in requests:
            self.base.check_request(request)
        results = [GenerationResult(tokens=[], finish_reason="length", prompt_tokens=len(r.prompt_ids))
                   for r in requests]
        together: list[Row] = []
        for row in zip(requests, results, strict=True):
            if row[0].max_new_tokens == 0:
                self.on_finish(*row)
            elif self.prefills_alone(row[0]):
                self.prefilling.append(self._chunked_prefill(*row))
            else:
                together.append(row)
        if together:
            started = time.perf_counter()
            self._book(self._prefill(together), started)
        return results

    @torch.no_grad()
    def advance_prefill(self) -> None:
        """Prefill the next chunk of the oldest long prompt; it becomes a row once its prompt is in and it can join.
        A chunk that fails drops that prompt (and raises)."""
        prefill = self.prefilling[0]
        try:
            prefill.advance()
        except Exception:
            self.prefilling.popleft()
            raise
        if prefill.done and self.can_join(prefill.length):
            self.prefilling.popleft()
            self._join_prefilled(prefill)
            self._book([(prefill.request, prefill.result)], prefill.started)

    def _book(self, rows: list[Row], started: float) -> None:
        for request, result in rows:
            self._requests.append(request)
            self.results.append(result)
            self.generators.append(_generator(request.sampling))
            self.started.append(started)

    # -- decoding -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Choose every row's next token, let the rows that end leave, decode one position for the others."""
        if not self._requests:
            return
        logits = self._logits()  # [B, V]
        choosable = hold_stops(logits, self._requests, self.results, self.eos)
        next_ids = choosable.argmax(-1)
        for row, (request, generator) in enumerate(zip(self._requests, self.generators, strict=True)):
            if request.sampling.temperature > 0:
                next_ids[row] = choose_next(choosable[row : row + 1], request.sampling, generator)[0]
        now = time.perf_counter()
        keep = []
        for row, token in enumerate(next_ids.tolist()):
            request, result = self._requests[row], self.results[row]
            reason = record_token(request, result, logits[row : row + 1], token, self.eos, now, self.started[row])
            if reason is None:
                keep.append(row)
            else:
                result.finish_reason = reason
                self.on_finish(request, result)
        if len(keep) < len(next_ids):
            next_ids = next_ids[torch.tensor(keep, dtype=torch.long, device=next_ids.device)]
        self._keep(keep)
        if self._requests:
            self._advance(next_ids)

    @torch.no_grad()
    def cancel(self, drop: Callable[[GenerationRequest], bool], reason: str = "cancelled") -> None:
        """Remove the rows (and prompts still prefilling) whose request ``drop`` names, between steps."""
        for prefill in [p for p in self.prefilling if drop(p.request)]:
            self.prefilling.remove(prefill)
            prefill.result.finish_reason = reason
            self.on_finish(prefill.request, prefill.result)
        keep = [row for row, request in enumerate(self._requests) if not drop(request)]
        for row, request in enumerate(self._requests):
            if row not in keep:
                self.results[row].finish_reason = reason
                self.on_finish(request, self.results[row])
        self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self._requests):
            return
        self._requests = [self._requests[r] for r in rows]
        self.results = [self.results[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        self.started = [self.started[r] for r in rows]
        self._select(rows)

    # -- what a family supplies -----------------------------------------------------------------------------------
    def _prefill(self, rows: list[Row]) -> list[Row]:
        """Prefill ``rows`` into this batch's state; returns them in the order they now follow the running rows."""
        raise NotImplementedError

    def _chunked_prefill(self, request: GenerationRequest, result: GenerationResult):
        """A prefill of ``request`` alone in chunks (only for families that ``prefills_in_chunks``)."""
        raise NotImplementedError

    def _join_prefilled(self, prefill) -> None:
        """Append a finished chunked prefill's state as the last row."""
        raise NotImplementedError

    def _logits(self) -> torch.Tensor:
        """Each row's next-token logits ``[B, V]``, in row order."""
        raise NotImplementedError

    def _select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (row indices, in order; possibly none) of the state."""
        raise NotImplementedError

    def _advance(self, tokens: torch.Tensor) -> None:
        """Feed each row's chosen token (``tokens [B]``) and compute the next logits."""
        raise NotImplementedError

    def can_join(self, length: int) -> bool:
        """Whether rows whose prefill spans ``length`` positions can join now."""
        return True

    def cache_length(self) -> int:
        """Positions the longest row's cache spans now."""
        raise NotImplementedError


@torch.no_grad()
def decode_batch(base, requests: list[GenerationRequest], stop_default: frozenset[int] | None = None,
                 ) -> list[GenerationResult]:
    """Decode every request in ONE batch to the end; ``stop_default``: the stop ids of requests that name none
    (default: the model's EOS, ``eos_ids``)."""
    batch = base.new_batch(stop_default)
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


__all__ = ["DecodeLoop", "Row", "RowBatch", "decode_batch", "generate_ids"]
