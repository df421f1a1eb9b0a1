"""The serving engine: batched generation and scoring over a frozen model, one artifact (or none) per row. No HTTP.

Token ids and the two artifacts only. Generation is the one decode loop (``model/decode.decode_batch``: mixed
adapters, per-row stop rules and sampling, finished rows dropped from the cache), in chunks of ``max_batch`` rows;
scoring batches every (prompt + candidate) row of every request and projects only the candidate positions.

Soft prompts are served as the KV they produce: ``Engine.prepare`` runs a soft prompt through the model ONCE
(``BaseModel.soft_prompt_to_kv``) and the result is an exact KV prefix, so a prompt-tuning adapter costs no more per
request than a prefix-tuning one (the per-request prefill no longer recomputes the P virtual positions).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from softprompts.errors import SoftpromptsError
from softprompts.evaluate import row_label_scores, serving_artifact
from softprompts.model.artifacts import Artifact
from softprompts.model.decode import decode_batch
from softprompts.model.generation import (
    GenerationRequest,
    GenerationResult,
    TokenLogprob,
    check_length,
    eos_ids,
    left_pad,
    token_logprobs,
)
from softprompts.model.inject import VirtualContext, forward


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
    """Batched generation and scoring on one ``BaseModel``; thread-safe (one model lock).

    ``max_batch`` bounds rows per forward (larger inputs are split); ``context_limit`` defaults to the model's
    ``max_position_embeddings`` (or ``n_positions``).
    """

    def __init__(self, base, max_batch: int = 64, context_limit: int | None = None):
        self.base = base
        self.max_batch = max_batch
        self.context_limit = context_limit or base.context_limit
        self.lock = threading.RLock()  # one forward at a time on the model
        self.eos_ids = frozenset(eos_ids(base))

    # -- artifacts ------------------------------------------------------------------------------------------
    def prepare(self, artifact: Artifact | None) -> Artifact | None:
        """The artifact as it is served (``evaluate.serving_artifact``): a soft prompt becomes its exact KV prefix,
        computed once, here (on an encoder-decoder base it stays a soft prompt)."""
        with self.lock:
            return serving_artifact(self.base, artifact)

    def check_length(self, prompt_tokens: int, virtual_tokens: int, max_new_tokens: int,
                     new_what: str = "max_tokens") -> None:
        """Raise ``ContextLengthError`` naming the limit when prompt + virtual + new tokens exceed the context."""
        check_length(self.context_limit, prompt_tokens, virtual_tokens, max_new_tokens, new_what)

    # -- generation -----------------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Decode every request; rows of one chunk of ``max_batch`` share each forward (``decode_batch``)."""
        results: list[GenerationResult] = []
        for start in range(0, len(requests), self.max_batch):
            with self.lock:
                results.extend(decode_batch(self.base, requests[start : start + self.max_batch], self.eos_ids))
        return results

    # -- scoring --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Sum of log-probabilities of each candidate after its prompt (rank classification), per request.

        All (prompt + candidate) rows of all requests are batched: ``[sum_i len(candidates_i), T]``, left-padded,
        each with its request's artifact; only the last ``max(len(candidate))`` positions are projected to vocab.
        """
        if self.base.is_encoder_decoder:  # the decoder writes each candidate, EOS included (evaluate.py)
            with self.lock:
                scores = row_label_scores(self.base, [r.artifact for r in requests], [r.prompt_ids for r in requests],
                                          [r.candidates for r in requests], self.max_batch)
            return [s.tolist() for s in scores]
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
        if self.base.is_encoder_decoder and requests:
            raise SoftpromptsError("echo with logprobs scores the prompt's own tokens, which an encoder-decoder model "
                                   "reads with its encoder and never predicts; send echo without logprobs")
        out: list[list[TokenLogprob | None]] = []
        start = 0
        while start < len(requests):
            stop = start + 1
            while (stop < len(requests) and stop - start < self.max_batch and (stop + 1 - start)
                   * max(len(r.prompt_ids) for r in requests[start : stop + 1]) <= LOGPROB_TOKENS_PER_FORWARD):
                stop += 1
            chunk = requests[start:stop]
            ids, mask = left_pad([r.prompt_ids for r in chunk], self.base.pad_id, self.base.device)  # [b, T]
            with self.lock:
                logits = forward(self.base, VirtualContext.from_rows([r.artifact for r in chunk]), ids, mask).logits
            width = ids.shape[1]
            for row, req in enumerate(chunk):
                first = width - len(req.prompt_ids)  # left padding
                tokens = ids[row, first + 1 :]
                out.append([None, *token_logprobs(logits[row, first : width - 1], tokens, req.top)])
            start = stop
        return out

    def _score_rows(self, rows: list[list[int]], artifacts: list, lengths: list[int]) -> list[float]:
        base = self.base
        ids, mask = left_pad(rows, base.pad_id, base.device)  # [B, T]
        width = max(lengths)
        total = ids.shape[1]
        positions = torch.arange(total - width - 1, total - 1, device=base.device)  # predict the last `width` ids
        logits = forward(base, VirtualContext.from_rows(artifacts), ids, mask, logits_positions=positions).logits
        logprobs = logits.float().log_softmax(-1)  # [B, width, V]
        targets = ids[:, total - width :]  # [B, width]
        picked = logprobs.gather(-1, targets[..., None])[..., 0]  # [B, width]
        starts = width - torch.tensor(lengths, device=base.device)  # [B]: where each candidate's tokens begin
        keep = torch.arange(width, device=base.device)[None, :] >= starts[:, None]
        return (picked * keep).sum(1).tolist()


__all__ = ["Engine", "OneStepRequest", "PromptLogprobsRequest", "ScoreRequest"]
