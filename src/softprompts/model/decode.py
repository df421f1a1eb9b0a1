"""Our own prefill/decode loop (no HF ``generate``): injected prefill, then one token per step from the cache.

Rows may carry different artifacts (or none) and different prompt lengths: prompts are left-padded to ``T``, the
virtual context is batched by ``VirtualContext.from_rows`` and every step feeds ``next_ids [B]`` at each row's own
next position. Greedy by default; sampling with temperature, top-k and top-p from a seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softprompts.model.artifacts import Artifact
from softprompts.model.inject import VirtualContext, decode_step, forward


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; seed makes sampling reproducible."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def errors(self) -> list[str]:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        return problems


GREEDY = Sampling()


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` -> ``ids [B, T]`` and ``mask [B, T]``, left-padded so every row ends at the last column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def choose_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """``logits [B, V]`` -> token ids ``[B]``."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = scores.topk(min(sampling.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_scores.softmax(-1) > sampling.top_p  # keep the smallest set reaching top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate_ids(
    base,
    prompts: list[list[int]],
    artifacts: list[Artifact | None] | Artifact | None = None,
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    stop_ids: set[int] | None = None,
) -> list[list[int]]:
    """New token ids per row (stop tokens excluded). ``artifacts``: one for all rows, or one per row."""
    if not prompts:
        return []
    if not isinstance(artifacts, list):
        artifacts = [artifacts] * len(prompts)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    stop_ids = set(stop_ids if stop_ids is not None else eos_ids(base))
    pad_id = base.tokenizer.pad_token_id if base.tokenizer is not None and base.tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad_id, base.device)
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    state = forward(base, VirtualContext.from_rows(artifacts), ids, mask, use_cache=True)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for step in range(max_new_tokens):
        next_ids = choose_next(state.logits[:, -1], sampling, generator)
        for i, tok in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if tok in stop_ids:
                done[i] = True
            else:
                outputs[i].append(tok)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        state = decode_step(base, state, next_ids)
    return outputs


def eos_ids(base) -> set[int]:
    eos = getattr(base.model.generation_config, "eos_token_id", None) or getattr(base.model.config, "eos_token_id", None)
    if eos is None and base.tokenizer is not None:
        eos = base.tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list | tuple) else {int(eos)}
