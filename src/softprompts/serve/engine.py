"""The serving engine: batched prefill/decode over a frozen model, one artifact (or none) per row. No HTTP here.

Token ids and the two artifacts only. A batch of ``B`` requests, each with its own prompt ``[T_i]``, artifact
(soft prompt, KV prefix or ``None``, of any virtual length ``P_i``), sampling parameters and stop rules, runs as:

    prefill : left-padded ids [B, T], VirtualContext.from_rows(artifacts) -> logits of the last column [B, 1, V]
    decode  : one token per active row per step, from the KV cache ([B_active, H_l, P + T + t, D_l] per layer)

Rows that finish are dropped from the cache (``batch_select_indices``), so a long request does not make short ones
pay for padding. Each row's tokens equal that request run alone: masking hides other rows' virtual slots and
padding, and every row keeps its own positions (real tokens start at its own ``P_i``, see ``model/inject.py``).

Soft prompts are served as the KV they produce: ``Engine.prepare`` runs a soft prompt through the model ONCE
(``BaseModel.soft_prompt_to_kv``) and the result is an exact KV prefix, so a prompt-tuning adapter costs no more per
request than a prefix-tuning one (the per-request prefill no longer recomputes the P virtual positions).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from softprompts.errors import SoftpromptsError
from softprompts.model.artifacts import Artifact, SoftPrompt
from softprompts.model.decode import GREEDY, Sampling, choose_next, eos_ids, left_pad
from softprompts.model.inject import Prefill, VirtualContext, decode_step, forward


class ContextLengthError(SoftpromptsError):
    """A request that does not fit the model's context window (the message names the limit)."""


@dataclass
class GenerationRequest:
    """One row to decode.

    ``artifact``: what to inject (``None`` = base model); use ``Engine.prepare`` once per adapter to turn a soft
    prompt into its cached KV. ``stop_ids``: tokens that end the row (excluded from the output; ``None`` = the
    model's EOS). ``stop_check(new_ids) -> bool`` is called after every token (stop strings live there).
    ``on_token(token_id)`` is called from the engine thread as each token is accepted (streaming).
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


@dataclass
class ScoreRequest:
    """Rank classification: log-probability of each ``candidates[j]`` (token ids) following ``prompt_ids``."""

    prompt_ids: list[int]
    candidates: list[list[int]]
    artifact: Artifact | None = None


class Engine:
    """Batched generation and scoring on one ``BaseModel``; thread-safe (one model lock).

    ``max_batch`` bounds rows per forward (larger inputs are split); ``context_limit`` defaults to the model's
    ``max_position_embeddings`` (or ``n_positions``).
    """

    def __init__(self, base, max_batch: int = 64, context_limit: int | None = None):
        self.base = base
        self.max_batch = max_batch
        self.context_limit = context_limit or _context_limit(base)
        self.lock = threading.RLock()  # one forward at a time on the model
        tok = base.tokenizer
        self.pad_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        self.eos_ids = frozenset(eos_ids(base))

    # -- artifacts ------------------------------------------------------------------------------------------
    def prepare(self, artifact: Artifact | None) -> Artifact | None:
        """The artifact as it is served: a soft prompt becomes its exact KV prefix (computed once, here)."""
        if artifact is None:
            return None
        artifact = artifact.to(device=self.base.device, dtype=self.base.dtype)
        if isinstance(artifact, SoftPrompt):
            with self.lock:
                return self.base.soft_prompt_to_kv(artifact)
        return artifact

    def check_length(self, prompt_tokens: int, virtual_tokens: int, max_new_tokens: int) -> None:
        """Raise ``ContextLengthError`` naming the limit when prompt + virtual + new tokens exceed the context."""
        total = prompt_tokens + virtual_tokens + max_new_tokens
        if prompt_tokens < 1:
            raise ContextLengthError("the prompt must have at least one token")
        if total > self.context_limit:
            raise ContextLengthError(
                f"this model's context limit is {self.context_limit} tokens; the request needs {total} "
                f"({prompt_tokens} prompt + {virtual_tokens} virtual + {max_new_tokens} max_tokens): "
                "shorten the prompt or lower max_tokens"
            )

    # -- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Decode every request; rows of one chunk of ``max_batch`` share each forward."""
        results: list[GenerationResult] = []
        for start in range(0, len(requests), self.max_batch):
            with self.lock:
                results.extend(self._generate_batch(requests[start : start + self.max_batch]))
        return results

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        started = time.perf_counter()
        base = self.base
        ids, mask = left_pad([r.prompt_ids for r in requests], self.pad_id, base.device)  # [B, T]
        ctx = VirtualContext.from_rows([r.artifact for r in requests])
        last = torch.tensor([ids.shape[1] - 1], device=base.device)  # left padding: every row ends here
        state = forward(base, ctx, ids, mask, use_cache=True, logits_positions=last)  # logits [B, 1, V]
        generators = [_generator(r.sampling) for r in requests]
        outputs: list[list[int]] = [[] for _ in requests]
        results: list[GenerationResult | None] = [None] * len(requests)
        active = list(range(len(requests)))  # request index of each row of `state`
        ttft = 0.0
        while True:
            logits = state.logits[:, -1]  # [B_active, V]
            next_ids = self._choose(logits, [requests[i] for i in active], [generators[i] for i in active])
            if not ttft:
                ttft = time.perf_counter() - started
            keep = []
            for row, (i, tok) in enumerate(zip(active, next_ids.tolist(), strict=True)):
                req = requests[i]
                if req.collect_logits:
                    results_logits = _logits_store(results, i, len(req.prompt_ids))
                    results_logits.logits.append(logits[row].float().cpu())
                reason = None
                if tok in (req.stop_ids if req.stop_ids is not None else self.eos_ids):
                    reason = "stop"
                else:
                    outputs[i].append(tok)
                    if req.on_token is not None:
                        req.on_token(tok)
                    if req.stop_check is not None and req.stop_check(outputs[i]):
                        reason = "stop"
                    elif len(outputs[i]) >= req.max_new_tokens:
                        reason = "length"
                if reason is None:
                    keep.append(row)
                else:
                    res = _logits_store(results, i, len(req.prompt_ids))
                    res.tokens, res.finish_reason, res.time_to_first_token_s = outputs[i], reason, ttft
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=base.device)
                state = _select_rows(state, index)
                next_ids = next_ids[index]
                active = [active[r] for r in keep]
            state = decode_step(base, state, next_ids)
        return results  # type: ignore[return-value]

    def _choose(
        self, logits: torch.Tensor, requests: list[GenerationRequest], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """Next token per row ``[B]``: greedy rows by one argmax, sampled rows each with their own generator."""
        chosen = logits.argmax(-1)
        for row, (req, gen) in enumerate(zip(requests, generators, strict=True)):
            if req.sampling.temperature > 0:
                chosen[row] = choose_next(logits[row : row + 1], req.sampling, gen)[0]
        return chosen

    # -- scoring --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Sum of log-probabilities of each candidate after its prompt (rank classification), per request.

        All (prompt + candidate) rows of all requests are batched: ``[sum_i len(candidates_i), T]``, left-padded,
        each with its request's artifact; only the last ``max(len(candidate))`` positions are projected to vocab.
        """
        rows, artifacts, lengths, owners = [], [], [], []
        for i, req in enumerate(requests):
            for cand in req.candidates:
                rows.append(list(req.prompt_ids) + list(cand))
                artifacts.append(req.artifact)
                lengths.append(len(cand))
                owners.append(i)
        scores: list[list[float]] = [[] for _ in requests]
        for start in range(0, len(rows), self.max_batch):
            chunk = slice(start, start + self.max_batch)
            with self.lock:
                values = self._score_rows(rows[chunk], artifacts[chunk], lengths[chunk])
            for owner, value in zip(owners[chunk], values, strict=True):
                scores[owner].append(value)
        return scores

    def _score_rows(self, rows: list[list[int]], artifacts: list, lengths: list[int]) -> list[float]:
        base = self.base
        ids, mask = left_pad(rows, self.pad_id, base.device)  # [B, T]
        width = max(lengths)
        total = ids.shape[1]
        positions = torch.arange(total - width - 1, total - 1, device=base.device)  # predict the last `width` ids
        logits = forward(base, VirtualContext.from_rows(artifacts), ids, mask, logits_positions=positions).logits
        logprobs = logits.float().log_softmax(-1)  # [B, width, V]
        targets = ids[:, total - width :]  # [B, width]
        picked = logprobs.gather(-1, targets[..., None])[..., 0]  # [B, width]
        keep = torch.arange(width, device=base.device)[None, :] >= (width - torch.tensor(lengths, device=base.device))[:, None]
        return (picked * keep).sum(1).tolist()


def _logits_store(results: list, i: int, prompt_tokens: int) -> GenerationResult:
    if results[i] is None:
        results[i] = GenerationResult(tokens=[], finish_reason="length", prompt_tokens=prompt_tokens)
    return results[i]


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


def _generator(sampling: Sampling) -> torch.Generator | None:
    if sampling.temperature == 0 or sampling.seed is None:
        return None
    return torch.Generator().manual_seed(int(sampling.seed))


def _context_limit(base) -> int:
    config = base.model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
