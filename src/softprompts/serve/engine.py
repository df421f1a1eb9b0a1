"""The serving engine: what the scheduler runs besides the decode loop, over one frozen model. No HTTP.

Token ids and the two artifacts only. Generation is the base model's decode loop, which the scheduler drives
(``FrozenBase.new_batch``); the engine prepares artifacts, scores candidates (rank classification, the base model's
``row_label_scores``: every (prompt + candidate) row of every request batched) and answers prompt log-probabilities.

Soft prompts are served as the KV they produce: ``Engine.prepare`` runs a soft prompt through the model ONCE
(``FrozenBase.serving_artifact``) and the result is an exact KV prefix, so a prompt-tuning adapter costs no more per
request than a prefix-tuning one (the per-request prefill no longer recomputes the P virtual positions).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from softprompts.model.artifacts import Artifact, VirtualContext
from softprompts.model.generation import TokenLogprob, eos_ids, token_logprobs
from softprompts.model.padding import pad_rows


@dataclass
class ScoreRequest:
    """Rank classification: log-probability of each ``candidates[j]`` (token ids) following ``prompt_ids``."""

    prompt_ids: list[int]
    candidates: list[list[int]]
    artifact: Artifact | None = None


@dataclass
class PromptLogprobsRequest:
    """The log-probability of each prompt token after the ones before it (and the virtual tokens), with the ``top``
    alternatives: what ``echo`` with ``logprobs`` answers (loglikelihood evaluation)."""

    prompt_ids: list[int]
    artifact: Artifact | None = None
    top: int = 0


OneStepRequest = ScoreRequest | PromptLogprobsRequest
LOGPROB_TOKENS_PER_FORWARD = 1024  # rows x positions projected to the vocabulary at once (bounds [N, V] logits)


class Engine:
    """Scoring and artifact preparation on one base model; thread-safe (one model lock, which the scheduler's
    decode steps take too). ``max_batch`` bounds rows per forward (larger inputs are split)."""

    def __init__(self, base, max_batch: int = 64):
        self.base = base
        self.max_batch = max_batch
        self.lock = threading.RLock()  # one forward at a time on the model
        self.eos_ids = frozenset(eos_ids(base))

    def prepare(self, artifact: Artifact | None) -> Artifact | None:
        """The artifact as it is served, computed once, here (``FrozenBase.serving_artifact``: on a decoder-only base
        a soft prompt becomes its exact KV prefix)."""
        with self.lock:
            return self.base.serving_artifact(artifact)

    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Sum of log-probabilities of each candidate after its prompt (rank classification), per request: every
        candidate of every request in batches of ``max_batch`` rows, each with its request's artifact."""
        with self.lock:
            scores = self.base.row_label_scores([r.artifact for r in requests], [r.prompt_ids for r in requests],
                                                [r.candidates for r in requests], self.max_batch)
        return [s.tolist() for s in scores]

    def one_step(self, requests: list[OneStepRequest]) -> list:
        """Answer requests that need one forward each (scoring, prompt logprobs), in order."""
        out: list = [None] * len(requests)
        for kind, run in ((ScoreRequest, self.score), (PromptLogprobsRequest, self.prompt_logprobs)):
            picked = [i for i, r in enumerate(requests) if isinstance(r, kind)]
            for i, result in zip(picked, run([requests[i] for i in picked]) if picked else [], strict=True):
                out[i] = result
        return out

    @torch.no_grad()
    def prompt_logprobs(self, requests: list[PromptLogprobsRequest]) -> list[list[TokenLogprob | None]]:
        """Per request, ``None`` for the first prompt token (OpenAI's convention) then each later token's
        ``TokenLogprob``. Rows are batched while rows x width stays within ``LOGPROB_TOKENS_PER_FORWARD``."""
        if requests:
            self.base.require("prompt_logprobs")
        out: list[list[TokenLogprob | None]] = []
        start = 0
        while start < len(requests):
            stop = start + 1
            while (stop < len(requests) and stop - start < self.max_batch and (stop + 1 - start)
                   * max(len(r.prompt_ids) for r in requests[start : stop + 1]) <= LOGPROB_TOKENS_PER_FORWARD):
                stop += 1
            out += self._prompt_logprobs(requests[start:stop])
            start = stop
        return out

    def _prompt_logprobs(self, chunk: list[PromptLogprobsRequest]) -> list[list[TokenLogprob | None]]:
        ids, mask = pad_rows([r.prompt_ids for r in chunk], self.base.pad_id, self.base.device)  # [b, T]
        with self.lock:
            logits = self.base.token_logits(VirtualContext.from_rows([r.artifact for r in chunk]), ids, mask)
        width = ids.shape[1]
        out = []
        for row, req in enumerate(chunk):
            first = width - len(req.prompt_ids)  # left padding
            tokens = ids[row, first + 1 :]
            out.append([None, *token_logprobs(logits[row, first : width - 1], tokens, req.top)])
        return out


__all__ = ["Engine", "OneStepRequest", "PromptLogprobsRequest", "ScoreRequest"]
