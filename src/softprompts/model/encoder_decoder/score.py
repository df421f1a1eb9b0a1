"""Teacher-forced scoring on encoder-decoder bases: the training loss and the log-likelihood of targets.

A target ``y = (y_1..y_n)`` is written by the decoder after the prompt ``x`` was read by the encoder::

    decoder input  [start, y_1, ..., y_n]          labels [y_1, ..., y_n, eos]
    score(x, y) = sum_j log p(labels_j | x, decoder input_<=j)

The end-of-sequence token is part of every target (``with_eos``): the model learns where its answer stops, and rank
classification compares complete answers (``pos`` is not a prefix match of ``positive``).

Rows are batched by artifact kind and virtual length (``encoder_decoder.groups_by_length``): positions count the
prefix, so only rows of one length share an exact batch.
"""

from __future__ import annotations

import torch
from torch import nn

from softprompts.model.artifacts import Artifact, VirtualContext
from softprompts.model.encoder_decoder.forward import forward, groups_by_length
from softprompts.model.generation import eos_ids
from softprompts.model.padding import pad_rows


def with_eos(base, target: list[int]) -> list[int]:
    """``target`` ending with the model's end-of-sequence token (added unless it already ends with one)."""
    eos = sorted(eos_ids(base))
    if not eos or (target and target[-1] in eos):
        return list(target)
    return [*target, eos[0]]


def teacher_forced(base, ctx, prompts: list[list[int]], targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [B, L, V], labels [B, L])`` for full targets (``with_eos`` applied here); -100 labels padding."""
    device = base.device
    full = [with_eos(base, t) for t in targets]
    enc_ids, enc_mask = pad_rows(prompts, base.pad_id, device, side="right")
    dec_ids, dec_mask = pad_rows([[base.decoder_start_id, *t[:-1]] for t in full], base.pad_id, device, side="right")
    labels, label_mask = pad_rows(full, -100, device, side="right")
    logits = forward(base, ctx, enc_ids, enc_mask, dec_ids, dec_mask).logits
    return logits, labels.masked_fill(label_mask == 0, -100)


def loss_sum(base, artifact: Artifact | None, prompts: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
    """Sum over the rows' label tokens of the cross-entropy (training; ``artifact`` shared, keeps its graph)."""
    logits, labels = teacher_forced(base, VirtualContext.broadcast(artifact, len(prompts)), prompts, targets)
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                       reduction="sum")


@torch.no_grad()
def target_logprobs(base, artifacts: list[Artifact | None], prompts: list[list[int]], targets: list[list[int]],
                    batch_size: int = 16) -> list[float]:
    """Per row ``score(prompts[i], targets[i])`` (module docstring) with ``artifacts[i]``."""
    out = [0.0] * len(prompts)
    for group in groups_by_length(artifacts):
        group = sorted(group, key=lambda i: len(prompts[i]))
        for start in range(0, len(group), batch_size):
            rows = group[start : start + batch_size]
            ctx = VirtualContext.from_rows([artifacts[i] for i in rows])
            logits, labels = teacher_forced(base, ctx, [prompts[i] for i in rows], [targets[i] for i in rows])
            logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            for i, total in zip(rows, (logp * (labels != -100)).sum(1).tolist(), strict=True):
                out[i] = total
    return out


__all__ = ["loss_sum", "target_logprobs", "teacher_forced", "with_eos"]
