"""The one padder: token rows of different lengths -> a rectangular ``[B, W]`` batch and its mask.

``side="left"``: every row ends at the last column (decoder-only prefill: the next token of every row is read at
column ``W - 1``); ``side="right"``: every row starts at column 0 (encoder inputs, teacher-forced decoder targets).
Padded positions are always masked out (mask 0), so ``value`` never changes an output; ``-100`` pads labels.
"""

from __future__ import annotations

import torch


def pad_rows(rows: list[list[int]], value: int, device=None, side: str = "left",
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` -> ``(ids [B, W], mask [B, W])``, ``W`` = ``width`` or the longest row, padded on ``side`` with
    ``value`` (mask 1 = a token)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.as_tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def length_sorted_chunks(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batching: indices sorted by length, in chunks (results are put back in input order)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def prompt_target_rows(prompts: list[list[int]], targets: list[list[int]], pad_id: int, device=None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher forcing on a decoder-only model: rows ``prompt_i + target_i`` left-padded to ``W`` ->
    ``(ids [B, W], mask [B, W], labels [B, L], positions [L])``: ``labels`` hold each target right-aligned in the last
    ``L`` columns (-100 elsewhere), and the logits at column ``positions[j]`` predict ``labels[:, j]`` (the logits at
    column ``t`` predict the token at column ``t + 1``). Prompts are non-empty, so ``W > L``."""
    ids, mask = pad_rows([p + t for p, t in zip(prompts, targets, strict=True)], pad_id, device)
    labels, _ = pad_rows(targets, -100, device)  # [B, L], right-aligned like the rows
    width, span = ids.shape[1], labels.shape[1]
    positions = torch.arange(width - span - 1, width - 1, device=device)  # [L]
    return ids, mask, labels, positions


__all__ = ["length_sorted_chunks", "pad_rows", "prompt_target_rows"]
