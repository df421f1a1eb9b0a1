"""THE decode loop (no HF ``generate``): injected prefill, then one token per row per step from the KV cache.

A batch of ``B`` requests, each with its own prompt ``[T_i]``, artifact (soft prompt, KV prefix or ``None``, of any
virtual length ``P_i``), sampling parameters and stop rules, runs as::

    prefill : left-padded ids [B, T], VirtualContext.from_rows(artifacts) -> logits of the last column [B, 1, V]
    decode  : one token per active row per step, from the cache ([B_active, H_l, P + T + t, D_l] per layer)

A row ends on a stop token (excluded from its output; the model's EOS unless the request names others), when its
``stop_check`` says so (stop strings live there) or after ``max_new_tokens``. Rows that end are dropped from the
cache (``batch_select_indices``), so a long request does not make short ones pay for padding. Each row's tokens equal
that request run alone: masking hides other rows' virtual slots and padding, every row keeps its own positions (real
tokens start at its own ``P_i``, see ``inject.py``), and a sampled row draws from its own generator seeded with its
request's seed.

``decode_batch`` is used by the serving engine, by evaluation and by ``generate_ids`` (a thin call for token ids).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from softprompts.errors import SoftpromptsError
from softprompts.model.artifacts import Artifact
from softprompts.model.inject import Prefill, VirtualContext, decode_step, forward


class ContextLengthError(SoftpromptsError):
    """A request that does not fit the model's context window (the message names the limit), or asks for no
    tokens at all."""


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


@dataclass
class GenerationRequest:
    """One row to decode.

    ``artifact``: what to inject (``None`` = base model); a server turns a soft prompt into its cached KV once per
    adapter (``Engine.prepare``). ``stop_ids``: tokens that end the row (excluded from the output; ``None`` = the
    model's EOS). ``stop_check(new_ids) -> bool`` is called after every token (stop strings live there).
    ``on_token(token_id)`` is called as each token is accepted (streaming).
    """

    prompt_ids: list[int]
    artifact: Artifact | None = None
    max_new_tokens: int = 16
    sampling: Sampling = GREEDY
    stop_ids: frozenset[int] | None = None
    stop_check: Callable[[list[int]], bool] | None = None
    on_token: Callable[[int], None] | None = None
    collect_logits: bool = False  # keep each step's logits [V] (tests, debugging)


@dataclass
class GenerationResult:
    tokens: list[int]
    finish_reason: str  # "stop" (stop token or stop_check) or "length"
    prompt_tokens: int
    time_to_first_token_s: float = 0.0
    logits: list[torch.Tensor] = field(default_factory=list)  # [V] per generated step when collect_logits


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
    # float64, shifted so the best is 0: any temperature > 0 (1e-100 too) gives finite scores, never inf - inf
    scores = logits.double()
    scores = (scores - scores.max(dim=-1, keepdim=True).values) / sampling.temperature
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


def eos_ids(base) -> set[int]:
    """The model's end-of-sequence ids (generation config, then model config, then tokenizer)."""
    config, generation = base.model.config, base.model.generation_config
    eos = getattr(generation, "eos_token_id", None) or getattr(config, "eos_token_id", None)
    if eos is None and base.tokenizer is not None:
        eos = base.tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list | tuple) else {int(eos)}


def check_length(limit: int, prompt_tokens: int, virtual_tokens: int, max_new_tokens: int,
                 new_what: str = "max_tokens") -> None:
    """Raise ``ContextLengthError`` naming ``limit`` when prompt + virtual + new tokens exceed the context, or the
    prompt is empty. ``new_what`` names the third term in the message (``max_tokens``, ``label tokens``)."""
    total = prompt_tokens + virtual_tokens + max_new_tokens
    if prompt_tokens < 1:
        raise ContextLengthError("the prompt must have at least one token")
    if total > limit:
        raise ContextLengthError(
            f"this model's context limit is {limit} tokens; the request needs {total} "
            f"({prompt_tokens} prompt + {virtual_tokens} virtual + {max_new_tokens} {new_what}): "
            f"shorten the prompt or lower {new_what}"
        )


def _generator(sampling: Sampling) -> torch.Generator | None:
    if sampling.temperature == 0 or sampling.seed is None:
        return None
    return torch.Generator().manual_seed(int(sampling.seed))


def _choose(logits: torch.Tensor, requests: list[GenerationRequest],
            generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token per row ``[B]``: greedy rows by one argmax, sampled rows each with their own generator."""
    chosen = logits.argmax(-1)
    for row, (req, gen) in enumerate(zip(requests, generators, strict=True)):
        if req.sampling.temperature > 0:
            chosen[row] = choose_next(logits[row : row + 1], req.sampling, gen)[0]
    return chosen


def _select_rows(state: Prefill, index: torch.Tensor) -> Prefill:
    """Keep rows ``index`` of a decoding state (cache, mask, positions)."""
    for layer in state.cache.layers:
        layer.batch_select_indices(index)
    return Prefill(
        logits=state.logits[index],
        cache=state.cache,
        attention_mask=state.attention_mask[index],
        next_positions=state.next_positions[index],
    )


@torch.no_grad()
def decode_batch(base, requests: list[GenerationRequest], stop_default: frozenset[int] | None = None,
                 ) -> list[GenerationResult]:
    """Decode every request in ONE batch (see the module docstring); ``stop_default``: the stop ids of requests
    that name none (default: the model's EOS, ``eos_ids``)."""
    for req in requests:  # the server's rule, everywhere: prompt + virtual + new tokens within the context
        if req.max_new_tokens < 0:
            raise ContextLengthError(f"max_new_tokens must be >= 0, got {req.max_new_tokens}")
        check_length(base.context_limit, len(req.prompt_ids), req.artifact.length if req.artifact else 0,
                     req.max_new_tokens)
    results = [GenerationResult(tokens=[], finish_reason="length", prompt_tokens=len(r.prompt_ids)) for r in requests]
    active = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]  # request index of each row of `state`
    if not active:
        return results
    started = time.perf_counter()
    eos = frozenset(eos_ids(base)) if stop_default is None else stop_default
    ids, mask = left_pad([requests[i].prompt_ids for i in active], base.pad_id, base.device)  # [B, T]
    ctx = VirtualContext.from_rows([requests[i].artifact for i in active])
    last = torch.tensor([ids.shape[1] - 1], device=base.device)  # left padding: every row ends here
    state = forward(base, ctx, ids, mask, use_cache=True, logits_positions=last)  # logits [B, 1, V]
    generators = {i: _generator(requests[i].sampling) for i in active}
    ttft = 0.0
    while True:
        logits = state.logits[:, -1]  # [B_active, V]
        next_ids = _choose(logits, [requests[i] for i in active], [generators[i] for i in active])
        ttft = ttft or time.perf_counter() - started
        keep = []
        for row, (i, tok) in enumerate(zip(active, next_ids.tolist(), strict=True)):
            req, res = requests[i], results[i]
            res.time_to_first_token_s = ttft
            if req.collect_logits:
                res.logits.append(logits[row].float().cpu())
            reason = None
            if tok in (req.stop_ids if req.stop_ids is not None else eos):
                reason = "stop"
            else:
                res.tokens.append(tok)
                if req.on_token is not None:
                    req.on_token(tok)
                if req.stop_check is not None and req.stop_check(res.tokens):
                    reason = "stop"
                elif len(res.tokens) >= req.max_new_tokens:
                    reason = "length"
            if reason is None:
                keep.append(row)
            else:
                res.finish_reason = reason
        if not keep:
            return results
        if len(keep) < len(active):
            index = torch.tensor(keep, device=base.device)
            state = _select_rows(state, index)
            next_ids = next_ids[index]
            active = [active[r] for r in keep]
        state = decode_step(base, state, next_ids)


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


__all__ = ["GREEDY", "ContextLengthError", "GenerationRequest", "GenerationResult", "Sampling", "check_length",
           "choose_next", "decode_batch", "eos_ids", "generate_ids", "left_pad"]
