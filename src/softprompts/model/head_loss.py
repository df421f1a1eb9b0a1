"""Cross-entropy through the FROZEN output head, chunked over rows, its gradient formed in the forward pass.

For hidden states ``h [N, H]`` (the decoder's last, after its final norm), the head weight ``W [V, H]`` (and bias
``b [V]`` where the head has one) and target ids ``y [N]`` (``-100`` = no label)::

    z_i   = W h_i + b                                     logits of row i, fp32, one chunk of n rows at a time
    loss  = sum_i valid_i * (logsumexp(z_i) - z_i[y_i])   the summed token cross-entropy (HF's, reduction="sum")
    dL/dh_i = valid_i * (softmax(z_i) - onehot(y_i)) W    [n, H]

``W`` and ``b`` are frozen (the base model never trains), so ``dL/dh`` is the only gradient there is, and it can be
formed chunk by chunk right after that chunk's loss. No ``[N, V]`` logits, log-probabilities or logit gradient ever
exist at once: the peak is one ``[n, V]`` fp32 chunk (``CHUNK_BYTES``), where HF's head + ``cross_entropy`` keeps
the logits, their fp32 copy and the log-softmax for the backward pass and then allocates the logit gradient (at the
Llama-3.2-1B anchor, 8 x 256 labels x 128,256 words: ~1 GiB each in fp32). The matmuls are the two the plain head's
forward and backward run anyway (no recomputation); the backward pass only scales the saved ``[N, H]`` gradient by the
incoming scalar. Rows without a label are dropped before projecting (ragged targets pad with ``-100``).

Used by the decoder-only training loss (``decoder.score.label_loss_sum``) where ``BaseModel.plain_head`` holds;
evaluation and decoding keep HF's head. Under ``torch.autocast`` the two matmuls run in the autocast dtype as HF's
head would (the weight cast once per call); softmax, the loss and the saved gradient are fp32.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from softprompts.model.soft_targets import SoftTargets

CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk: 523 rows at a 128,256-word vocabulary, 1,365 at 49,152


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's fp32 logits ``[n, V]`` fit in ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab))


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """``loss = sum CE(W h + b, y)`` over rows of ``h [N, H]`` (all labelled); gradient to ``h`` only. ``targets``:
    ``[N]`` ids (hard), or ``[N, k]`` ids with ``weights [N, k]`` (soft targets: ``CE(q, p) = lse * sum q - sum_j q_j
    z[y_j]``, gradient ``softmax(z) * sum q - scatter(q)``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, rows: int):  # noqa: ANN001 - autograd.Function signature
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_grad else None  # [N, H]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start : start + rows], targets[start : start + rows]  # [n, H], [n] or [n, k]
            logits = functional.linear(h.to(weight.dtype), weight, bias).float()  # [n, V]
            lse = torch.logsumexp(logits, dim=-1)  # [n]
            if weights is None:
                loss += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            else:
                q = weights[start : start + rows]  # [n, k]
                total = q.sum(1)  # [n]
                loss += (lse * total - (q * logits.gather(1, y)).sum(1)).sum()
            if want_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: [n, V]
                if weights is None:
                    probs[torch.arange(len(y), device=y.device), y] -= 1.0
                else:
                    probs.mul_(total[:, None]).scatter_add_(1, y, -q)
                grad[start : start + rows] = probs.to(weight.dtype) @ weight  # [n, H]
        if want_grad:
            ctx.save_for_backward(grad)
            ctx.hidden_dtype = hidden.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001
        (grad,) = ctx.saved_tensors  # fp32: the incoming scale (1 / N) is applied before the one rounding
        return (grad * grad_loss.float()).to(ctx.hidden_dtype), None, None, None, None, None


def labelled_rows(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices ``[N]`` of the entries of ``labels`` that carry a label (not -100).

    ``nonzero`` waits for the device: compute this before queueing the model's forward (``step.label_loss_sum``
    does) so the wait is not in the middle of the step.
    """
    return (labels.reshape(-1) != -100).nonzero().squeeze(1)


def head_cross_entropy_sum(
    hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, chunk_bytes: int = CHUNK_BYTES,
    keep: torch.Tensor | None = None, soft: SoftTargets | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``labels``; ``hidden [..., H]``, ``labels [...]`` (-100
    ignored).

    Equals ``cross_entropy(head(hidden).float().flatten(0, -2), labels.flatten(), ignore_index=-100,
    reduction="sum")`` in value and in its gradient to ``hidden`` (see the module docstring); the head must be frozen.
    ``keep``: ``labelled_rows(labels)`` when already computed. ``soft``: the teacher's top-k targets aligned with
    ``labels`` (``[..., k]``; ``model/soft_targets.py``): the loss is then ``sum CE(q, softmax(z))`` at the labelled
    entries (``soft_cross_entropy_sum``'s value and gradient). Under ``torch.autocast`` the head's weight is cast to
    the autocast dtype once here (autocast does not cache casts of frozen weights: it would recast per chunk).
    """
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        raise ValueError("head_cross_entropy_sum needs a frozen output head (it returns no gradient for the head)")
    weight, bias = head.weight, head.bias
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    keep = labelled_rows(labels) if keep is None else keep
    rows = hidden.reshape(-1, hidden.shape[-1])[keep]  # [N, H]
    if soft is None:
        targets, weights = labels.reshape(-1)[keep], None
    else:
        targets, weights = soft.ids.reshape(-1, soft.k)[keep], soft.probs.reshape(-1, soft.k)[keep].float()
    return _FrozenHeadCrossEntropy.apply(rows, weight, bias, targets, weights,
                                         chunk_rows(weight.shape[0], chunk_bytes))


__all__ = ["CHUNK_BYTES", "chunk_rows", "head_cross_entropy_sum", "labelled_rows"]
