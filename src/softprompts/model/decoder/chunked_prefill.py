"""A long prompt prefilled a chunk at a time, so that running rows wait one chunk per step, not a whole prefill."""

from __future__ import annotations

import time

import torch

from softprompts.model.artifacts import VirtualContext
from softprompts.model.decoder.inject import Prefill, extend, forward
from softprompts.model.generation import GenerationRequest, GenerationResult


class ChunkedPrefill:
    """One request's prompt prefilled ``chunk`` tokens per ``advance()`` into a cache of its own, so that a long
    prompt delays the running rows by one chunk per step instead of its whole prefill; ``DecodeBatch`` makes it a row
    once ``done`` (``RowBatch.advance_prefill``; the batch checked the request when it was added). Chunk ``k`` is
    ``inject.extend`` over the cache of chunks ``< k`` (the first one injects the artifact): the same state as a
    one-shot prefill (``tests/test_scheduler.py``); a row's embedding offsets continue from chunk to chunk."""

    def __init__(self, base, request: GenerationRequest, chunk: int, result: GenerationResult) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.base, self.request, self.chunk, self.result = base, request, chunk, result
        self.state: Prefill | None = None
        self.position = 0  # prompt tokens prefilled so far
        self.started = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.position == len(self.request.prompt_ids)

    @property
    def length(self) -> int:
        """Positions its cache spans (virtual + prompt tokens so far)."""
        return 0 if self.state is None else int(self.state.attention_mask.shape[1])

    @torch.no_grad()
    def advance(self) -> int:
        """Prefill the next chunk; returns how many tokens it held."""
        end = min(self.position + self.chunk, len(self.request.prompt_ids))
        ids = torch.tensor([self.request.prompt_ids[self.position : end]], device=self.base.device)  # [1, n]
        if self.state is None:
            last = torch.tensor([ids.shape[1] - 1], device=self.base.device)
            self.state = forward(self.base, self.request.artifact, ids, use_cache=True, logits_positions=last)
        else:
            offsets = VirtualContext.offsets_of([self.request.artifact])
            self.state = extend(self.base, self.state, ids, offsets, first_index=self.position)
        count, self.position = end - self.position, end
        return count


__all__ = ["ChunkedPrefill"]
