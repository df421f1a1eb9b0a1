"""Soft targets: a teacher's next-token distribution kept as its top ``k`` tokens, and the loss against it.

Context distillation (cartridges, ``methods/cartridge.py``) trains the student on the teacher's distribution at every
target position instead of the one token that followed. The teacher's full distribution ``[V]`` per position is too
big to keep for thousands of positions, so only its ``k`` most likely tokens are kept, renormalized::

    ids_i    = top-k(log p_teacher(. | i))                  [k] token ids
    q_i      = softmax(log p_teacher(ids_i | i))            [k] (sums to 1 over the kept tokens)
    loss     = sum_i sum_j q_ij * (-log p_student(ids_ij | i))   = sum_i CE(q_i, p_student)

which is the KL divergence ``KL(q_i || p_student)`` plus the constant entropy ``H(q_i)``, so it has the KL's
gradient: ``dloss/dz_i = softmax(z_i) * sum_j q_ij - scatter(q_i)`` for the student's logits ``z_i``. A hard target
is the case ``k = 1, q = 1`` (the plain cross-entropy).

``SoftTargets`` holds ``ids`` (long) and ``probs`` (float32) of one shape ``[..., k]``: ``[n, k]`` for one row's
``n`` target tokens (``tasks.Encoded``), ``[B, L, k]`` for a batch aligned with its ``labels [B, L]`` (``tasks.Batch``;
entries at unlabelled columns are zeros and never read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SoftTargets:
    """A teacher's top-``k`` tokens and their renormalized probabilities at target positions (``[..., k]`` each)."""

    ids: torch.Tensor  # long
    probs: torch.Tensor  # float32, each [..., :] sums to 1

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    def to(self, device) -> SoftTargets:
        return SoftTargets(self.ids.to(device), self.probs.to(device))


def top_k_targets(logits: torch.Tensor, k: int) -> SoftTargets:
    """The teacher's ``k`` most likely tokens at each position of ``logits [..., V]`` and their probabilities
    renormalized over those ``k`` (``[..., k]`` each)."""
    logp = logits.float().log_softmax(-1)
    top, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return SoftTargets(ids, top.softmax(-1))


def stack_rows(rows: list[SoftTargets | None], lengths: list[int], width: int, device=None) -> SoftTargets:
    """One ``[B, width, k]`` batch from per-row ``[n_b, k]`` targets: row ``b``'s ``n_b`` entries at its last
    ``n_b`` columns (left-padded rows end together, like ``labels``); a row without soft targets is an error."""
    if any(r is None for r in rows):
        raise ValueError("every row of a batch with soft targets needs them (a teacher distribution per target)")
    k = rows[0].k
    ids = torch.zeros(len(rows), width, k, dtype=torch.long)
    probs = torch.zeros(len(rows), width, k, dtype=torch.float32)
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        if row.ids.shape != (n, k):
            raise ValueError(f"row {b}: soft targets of shape {tuple(row.ids.shape)} for {n} target tokens, k={k}")
        ids[b, width - n :] = row.ids
        probs[b, width - n :] = row.probs
    return SoftTargets(ids.to(device), probs.to(device))


def soft_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, soft: SoftTargets) -> torch.Tensor:
    """``sum_i CE(q_i, softmax(z_i))`` over the labelled entries of ``logits [B, L, V]`` (``labels [B, L]``, -100 =
    none) against ``soft`` (``[B, L, k]``): HF's head output and autograd (``decoder.score.plain_label_loss_sum``)."""
    keep = labels != -100  # [B, L]
    logp = logits.float().log_softmax(-1)  # [B, L, V]
    picked = logp.gather(-1, soft.ids)  # [B, L, k]
    return -(picked * soft.probs * keep[..., None]).sum()


__all__ = ["SoftTargets", "soft_cross_entropy_sum", "stack_rows", "top_k_targets"]
