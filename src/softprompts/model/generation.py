"""The vocabulary of generation: requests and results, sampling, stop and length rules (no loop: ``decode_loop.py``).

``GenerationRequest``: one row to decode (prompt ids, artifact, limits, sampling, stop rules, streaming callback);
``GenerationResult``: its tokens and why it ended. The context rule a request must fit is the base model's
(``FrozenBase.check_request`` / ``check_fits``: each model family has its own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from softprompts.errors import SoftpromptsError
from softprompts.model.artifacts import Artifact


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
    ``on_token(token_id, logprob)`` is called as each token is accepted (streaming; ``logprob`` is its
    ``TokenLogprob`` when the request asks for ``logprobs``, else ``None``). ``min_new_tokens``: until that many
    tokens, the stop tokens are masked out of the choice (their logits set to -inf; logprobs stay the model's) and
    ``stop_check`` is not asked.
    """

    prompt_ids: list[int]
    artifact: Artifact | None = None
    max_new_tokens: int = 16
    sampling: Sampling = GREEDY
    stop_ids: frozenset[int] | None = None
    stop_check: Callable[[list[int]], bool] | None = None
    on_token: Callable[[int, TokenLogprob | None], None] | None = None
    collect_logits: bool = False  # keep each step's logits [V] (tests, debugging)
    logprobs: int | None = None  # per generated token: its log-probability and the top `logprobs` alternatives
    min_new_tokens: int = 0

    def stops(self, default: frozenset[int]) -> frozenset[int]:
        """The tokens that end this row: its ``stop_ids``, else ``default`` (the model's end of sequence)."""
        return self.stop_ids if self.stop_ids is not None else default


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's distribution at its position (``log_softmax`` of the logits,
    before temperature or top-k/top-p), with the ``top`` most likely tokens there as ``(id, logprob)``."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """``logits [N, V]`` at N positions and the ``tokens [N]`` that followed -> one ``TokenLogprob`` each."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0].tolist()
    best = logp.topk(min(top, logp.shape[-1]), dim=-1) if top else None
    out = []
    for i, (tok, value) in enumerate(zip(tokens.tolist(), chosen, strict=True)):
        alternatives = tuple(zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True)) if best else ()
        out.append(TokenLogprob(tok, value, alternatives))
    return out


@dataclass
class GenerationResult:
    tokens: list[int]
    finish_reason: str  # "stop" (stop token or stop_check), "length", "cancelled" or "timeout"
    prompt_tokens: int
    time_to_first_token_s: float = 0.0
    logits: list[torch.Tensor] = field(default_factory=list)  # [V] per generated step when collect_logits
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token when the request asks
    stop_token: int | None = None  # the stop token that ended the row (chosen, not in ``tokens``)

    @property
    def generated_tokens(self) -> int:
        """Every token the model chose: ``tokens`` and the stop token that ended them (what the decode cost)."""
        return len(self.tokens) + (self.stop_token is not None)


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


def hold_stops(logits: torch.Tensor, requests: list[GenerationRequest], results: list[GenerationResult],
               default_stop: frozenset[int]) -> torch.Tensor:
    """``logits [B, V]`` to choose from: a row still under its ``min_new_tokens`` has its stop tokens at -inf (the
    same tensor when no row is)."""
    held = [(row, sorted(r.stops(default_stop))) for row, (r, res) in enumerate(zip(requests, results, strict=True))
            if len(res.tokens) < r.min_new_tokens and r.stops(default_stop)]
    if not held:
        return logits
    logits = logits.clone()
    for row, stops in held:
        logits[row, torch.tensor(stops, device=logits.device)] = float("-inf")
    return logits


def record_token(request: GenerationRequest, result: GenerationResult, logits: torch.Tensor, token: int,
                 default_stop: frozenset[int], now: float, started: float) -> str | None:
    """Book the token a row chose from its ``logits [1, V]``: first-token time, ``collect_logits``, log-probabilities,
    ``on_token``. Returns the finish reason when the row ends here (``"stop"``: a stop token, not recorded, or its
    ``stop_check``; ``"length"``: ``max_new_tokens`` reached), else ``None``. One rule for every decode loop."""
    if not result.time_to_first_token_s:
        result.time_to_first_token_s = now - started
    if request.collect_logits:
        result.logits.append(logits[0].float().cpu())
    if token in request.stops(default_stop):
        result.stop_token = token
        return "stop"
    result.tokens.append(token)
    scored = None
    if request.logprobs is not None:
        scored = token_logprobs(logits, torch.tensor([token], device=logits.device), request.logprobs)[0]
        result.logprobs.append(scored)
    if request.on_token is not None:
        request.on_token(token, scored)
    if (request.stop_check is not None and len(result.tokens) >= request.min_new_tokens
            and request.stop_check(result.tokens)):
        return "stop"
    return "length" if len(result.tokens) >= request.max_new_tokens else None


def eos_ids(base) -> set[int]:
    """The model's end-of-sequence ids (generation config, then model config, then tokenizer)."""
    config, generation = base.model.config, base.model.generation_config
    eos = getattr(generation, "eos_token_id", None) or getattr(config, "eos_token_id", None)
    if eos is None and base.tokenizer is not None:
        eos = base.tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list | tuple) else {int(eos)}


__all__ = ["GREEDY", "ContextLengthError", "GenerationRequest", "GenerationResult", "Sampling", "TokenLogprob",
           "choose_next", "eos_ids", "hold_stops", "record_token", "token_logprobs"]
