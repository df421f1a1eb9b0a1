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

from softprompts.model.artifacts import Artifact
from softprompts.model.encoder_decoder import forward, groups_by_length
from softprompts.model.generation import eos_ids
from softprompts.model.inject import VirtualContext


def with_eos(base, target: list[int]) -> list[int]:
    """``target`` ending with the model's end-of-sequence token (added unless it already ends with one)."""
    eos = sorted(eos_ids(base))
    if not eos or (target and target[-1] in eos):
        return list(target)
    return [*target, eos[0]]


def right_pad(rows: list[list[int]], value: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` -> ``(ids [B, W], mask [B, W])`` padded on the right with ``value``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def teacher_forced(base, ctx, prompts: list[list[int]], targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [B, L, V], labels [B, L])`` for full targets (``with_eos`` applied here); -100 labels padding."""
    device = base.device
    full = [with_eos(base, t) for t in targets]
    enc_ids, enc_mask = right_pad(prompts, base.pad_id, device)
    dec_ids, dec_mask = right_pad([[base.decoder_start_id, *t[:-1]] for t in full], base.pad_id, device)
    labels, label_mask = right_pad(full, -100, device)
    logits = forward(base, ctx, enc_ids, enc_mask, dec_ids, dec_mask).logits
    return logits, labels.masked_fill(label_mask == 0, -100)


def loss_sum(base, artifact: Artifact | None, prompts: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
    """Sum over the rows' label tokens of the cross-entropy (training; ``artifact`` shared, keeps its graph)."""
    logits, labels = teacher_forced(base, VirtualContext.broadcast(artifact, len(prompts)), prompts, targets)
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                       reduction="sum")


def rows_of_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """The ``(prompts, targets)`` of a left-padded decoder-only training batch (``tasks.collate``: each row is
    ``prompt + target`` ending at the last column; ``labels [B, L]`` hold the target right-aligned, -100 elsewhere)."""
    prompts, targets = [], []
    for ids, mask, row_labels in zip(input_ids.tolist(), attention_mask.tolist(), labels.tolist(), strict=True):
        tokens = [t for t, m in zip(ids, mask, strict=True) if m]
        n = sum(1 for t in row_labels if t != -100)
        prompts.append(tokens[:-n])
        targets.append(tokens[-n:])
    return prompts, targets


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


__all__ = ["loss_sum", "right_pad", "rows_of_batch", "target_logprobs", "teacher_forced", "with_eos"]
