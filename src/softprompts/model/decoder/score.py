"""Teacher-forced scoring on decoder-only bases: the training loss and the log-likelihood of targets.

Rows are ``prompt + target``, left-padded (``padding.prompt_target_rows``); the logits at column ``t`` predict the
token at ``t + 1``, and the LM head runs only at the target columns (``logits_positions``)::

    loss      = sum over target tokens of -log p(y_j | context, x, y_<j)              (training, a scalar)
    score(c)  = sum_j log p(y^c_j | context, x, y^c_<j)                                (rank classification, [C_i])

Where the model's head is plain (``BaseModel.plain_head``: Llama, Qwen2, GPT-2, Gemma3, ...) the training loss runs
the head and the cross-entropy fused and chunked on the hidden states (``head_loss.py``: no ``[rows, V]`` logits kept
for the backward pass); otherwise HF's head at the label columns + ``cross_entropy`` (``plain_label_loss_sum``, also
what ``torch.compile`` traces). Same value and gradients either way. When every candidate is one token a single
forward per prompt scores them all (the same numbers, ``C`` times cheaper).

Embedding offsets (DePT) reach the prompt's tokens only: each row's prompt length is the count of its real tokens
minus its target's (``prompt_lengths``), so a target token never gets one, in training as in scoring and generation.
"""

from __future__ import annotations

import torch
from torch import nn

from softprompts.model.artifacts import VirtualContext
from softprompts.model.decoder.inject import forward, hidden_at
from softprompts.model.head_loss import head_cross_entropy_sum, labelled_rows
from softprompts.model.padding import length_sorted_chunks, prompt_target_rows
from softprompts.model.placement import place_rows
from softprompts.model.soft_targets import soft_cross_entropy_sum


def prompt_lengths(attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]`` real tokens of each ``prompt + target`` row that are prompt: its real tokens ``attention_mask [B, T]``
    less its target's, the labelled columns of ``labels [B, L]`` (targets are right-aligned, ``-100`` elsewhere)."""
    return attention_mask.long().sum(1) - (labels != -100).long().sum(1)


def label_loss_sum(base, artifact, batch) -> torch.Tensor:
    """Sum of target-token cross-entropies of one left-padded training batch (``tasks.Batch``: ``input_ids``,
    ``attention_mask [B, T]``, ``labels [B, L]``, ``positions [L]``, ``leads``, ``soft_targets``); the LM head only at
    labelled rows. With ``soft_targets`` (a teacher's top-k, ``[B, L, k]``) the loss at each labelled position is the
    cross-entropy against that distribution instead of the label (``model/soft_targets.py``: context distillation)."""
    if not base.plain_head:
        return plain_label_loss_sum(base, artifact, batch)
    keep = labelled_rows(batch.labels)  # before the forward is queued: its device sync then costs nothing
    ctx = place_rows(base, artifact, batch.leads)  # placement: the rows' leads in front of the soft prompt
    hidden = hidden_at(base, ctx, batch.input_ids, batch.attention_mask, batch.positions,
                       prompt_lengths(batch.attention_mask, batch.labels))  # [B, L, H]
    return head_cross_entropy_sum(hidden, base.model.get_output_embeddings(), batch.labels, keep=keep,
                                  soft=batch.soft_targets)


def plain_label_loss_sum(base, artifact, batch) -> torch.Tensor:
    """``label_loss_sum`` through HF's own head (``logits_to_keep`` = the label columns) and ``cross_entropy``."""
    ctx = place_rows(base, artifact, batch.leads)
    logits = forward(base, ctx, batch.input_ids, batch.attention_mask, logits_positions=batch.positions,
                     prompt_lengths=prompt_lengths(batch.attention_mask, batch.labels)).logits
    if batch.soft_targets is not None:
        return soft_cross_entropy_sum(logits, batch.labels, batch.soft_targets)
    return nn.functional.cross_entropy(
        logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction="sum"
    )  # logits: [B, L, V] -> [B*L, V]


def _context(artifacts, rows: list[int]):
    """What ``forward`` takes for batch ``rows``: the shared artifact, or the rows' own ones as a ``VirtualContext``."""
    return VirtualContext.from_rows([artifacts[i] for i in rows]) if isinstance(artifacts, list) else artifacts


@torch.no_grad()
def row_label_scores(base, artifacts, prompts: list[list[int]], verbalizations: list[list[list[int]]],
                     batch_size: int) -> list[torch.Tensor]:
    """Per prompt ``i`` a ``[C_i]`` tensor: the log-probability of each of ``verbalizations[i]`` after
    ``prompts[i]``. ``artifacts``: one served artifact for every row, or a list with one per row."""
    if all(len(t) == 1 for v in verbalizations for t in v):
        return _single_token_scores(base, artifacts, prompts, verbalizations, batch_size)
    scores = [torch.zeros(len(v)) for v in verbalizations]
    pairs = [(i, c) for i in range(len(prompts)) for c in range(len(verbalizations[i]))]
    lengths = [len(prompts[i]) + len(verbalizations[i][c]) for i, c in pairs]
    for chunk in length_sorted_chunks(lengths, batch_size):
        ids, mask, labels, positions = prompt_target_rows(
            [prompts[pairs[k][0]] for k in chunk], [verbalizations[pairs[k][0]][pairs[k][1]] for k in chunk],
            base.pad_id, base.device)
        ctx = _context(artifacts, [pairs[k][0] for k in chunk])
        logp = forward(base, ctx, ids, mask, logits_positions=positions,
                       prompt_lengths=prompt_lengths(mask, labels)).logits.float().log_softmax(-1)  # [B, L, V]
        token_lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
        for k, total in zip(chunk, token_lp.sum(1).cpu().tolist(), strict=True):
            i, c = pairs[k]
            scores[i][c] = total
    return scores


def _single_token_scores(base, artifacts, prompts: list[list[int]], verbalizations: list[list[list[int]]],
                         batch_size: int) -> list[torch.Tensor]:
    """``row_label_scores`` when every candidate is one token: one forward per prompt gives every candidate."""
    scores = [torch.zeros(len(v)) for v in verbalizations]
    for chunk in length_sorted_chunks([len(p) for p in prompts], batch_size):
        ids, mask, _, positions = prompt_target_rows([prompts[i][:-1] for i in chunk],
                                                     [prompts[i][-1:] for i in chunk], base.pad_id, base.device)
        last = positions[-1:] + 1  # the final column: logits after the whole prompt
        logits = forward(base, _context(artifacts, chunk), ids, mask, logits_positions=last).logits
        logp = logits[:, -1].float().log_softmax(-1).cpu()  # [B, V]
        for row, i in enumerate(chunk):
            scores[i] = logp[row, [t[0] for t in verbalizations[i]]]
    return scores


__all__ = ["label_loss_sum", "plain_label_loss_sum", "prompt_lengths", "row_label_scores"]
