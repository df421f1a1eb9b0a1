"""The training step: the summed target-token loss of a micro-batch and the gradient of one optimizer step.

One optimizer step (``loop.train`` calls ``accumulate_step``; see its docstring for the math)::

    A  = method()                       # once per optimizer step: prefix MLP / P-tuning encoder run once
    A' = detach(A) as leaves            # every micro-batch backprops into A' only
    loss_m = CE(LM head at label positions only) / N ;  loss_m.backward()
    A.backward(A'.grad * grad_scale)    # one exact backward through the method

The LM head + cross-entropy run fused and chunked where the head is plain (``head_loss.py``: the gradient to the
hidden states is formed in the forward pass, so no ``[rows, vocab]`` logits live until the backward pass).

``torch.compile`` (``compiled_loss``): the micro-batch loss (model forward, HF's LM head at label positions,
cross-entropy) traces as ONE graph for every method on every tested architecture (a test asserts zero graph breaks
with ``torch._dynamo.explain``), so AOTAutograd compiles its backward too; the method's own forward (prefix MLP,
P-tuning encoder) stays eager since it runs once per optimizer step.

Gradient checkpointing (``checkpoint_layers``) recomputes the decoder layers in the backward pass
(``grad_checkpoint.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from softprompts.model import encoder_decoder_score
from softprompts.model.artifacts import artifact_from_tensors
from softprompts.model.inject import forward, hidden_at
from softprompts.model.placement import PlacementError, place, place_rows
from softprompts.training.grad_checkpoint import checkpointing
from softprompts.training.head_loss import head_cross_entropy_sum, labelled_rows


def label_loss_sum(base, artifact, batch) -> torch.Tensor:
    """Sum of target-token cross-entropies of one left-padded ``tasks.Batch``; the LM head only at labelled rows.

    Where the model's head is plain (``BaseModel.plain_head``: Llama, Qwen2, GPT-2, Gemma3, ...) the head and the
    cross-entropy run fused and chunked on the decoder's hidden states (``head_loss.py``: no ``[rows, V]``
    logits are kept for the backward pass, unlabelled rows are never projected); otherwise HF's head at the label
    columns + ``cross_entropy`` (``plain_label_loss_sum``). Same value and gradients either way.
    """
    if base.is_encoder_decoder:
        return encoder_decoder_loss_sum(base, artifact, batch)
    if not base.plain_head:
        return plain_label_loss_sum(base, artifact, batch)
    keep = labelled_rows(batch.labels)  # before the forward is queued: its device sync then costs nothing
    ctx = place_rows(base, artifact, batch.leads)  # placement: the rows' leads in front of the soft prompt
    hidden = hidden_at(base, ctx, batch.input_ids, batch.attention_mask, batch.positions)  # [B, L, H]
    return head_cross_entropy_sum(hidden, base.model.get_output_embeddings(), batch.labels, keep=keep)


def encoder_decoder_loss_sum(base, artifact, batch) -> torch.Tensor:
    """``label_loss_sum`` on an encoder-decoder base: the encoder reads each row's prompt (its lead placed in front
    of the soft prompt), the decoder writes its target then EOS (``model/encoder_decoder_score.py``)."""
    prompts, targets = encoder_decoder_score.rows_of_batch(batch.input_ids, batch.attention_mask, batch.labels)
    if batch.leads and any(batch.leads):
        if len({tuple(lead) for lead in batch.leads}) > 1:
            raise PlacementError("rows of one batch with different text before the soft prompt on an "
                                 "encoder-decoder model; give them one lead")
        artifact = place(base, artifact, batch.leads[0])
    return encoder_decoder_score.loss_sum(base, artifact, prompts, targets)


def plain_label_loss_sum(base, artifact, batch) -> torch.Tensor:
    """``label_loss_sum`` through HF's own head (``logits_to_keep`` = the label columns) and ``cross_entropy``."""
    ctx = place_rows(base, artifact, batch.leads)
    logits = forward(base, ctx, batch.input_ids, batch.attention_mask, logits_positions=batch.positions).logits
    return nn.functional.cross_entropy(
        logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction="sum"
    )  # logits: [B, L, V] -> [B*L, V]


_COMPILED: dict[tuple[str, bool], Callable] = {}
RECOMPILE_LIMIT = 64  # artifact kinds x dtypes x base models in one process, each a guard set of its own


def compiled_loss(backend: str = "inductor", fullgraph: bool = False) -> Callable:
    """``plain_label_loss_sum`` under ``torch.compile`` (one compiled function per backend and mode, shared).

    The compiled step keeps HF's head + ``cross_entropy`` (one graph the compiler can fuse); the chunked fused head
    of ``label_loss_sum`` is an eager-mode memory saving whose Python loop over chunks would make dynamo specialize on
    every row count.

    Shapes vary between length-grouped batches; dynamo recompiles once and then treats the varying sizes as dynamic.
    ``fullgraph=False`` (training's choice): should a model we never tested break the graph, or a long process
    (sweeps, notebooks) exceed dynamo's recompile limit, that call runs eager instead of failing mid-run; the
    no-graph-break test is what keeps the supported architectures on one graph. ``fullgraph=True`` makes a break
    an error. The recompile limit is raised to ``RECOMPILE_LIMIT`` (never lowered).
    """
    key = (backend, fullgraph)
    if key not in _COMPILED:
        import torch._dynamo  # heavy: only when compiling

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED[key] = torch.compile(plain_label_loss_sum, fullgraph=fullgraph, backend=backend)
    return _COMPILED[key]


def accumulate_step(
    base,
    make_artifact: Callable[[], object],
    kind: str,
    micro_batches: Sequence,
    n_tokens: float,
    grad_scale: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    checkpoint_layers: bool = False,
    loss_fn: Callable = label_loss_sum,
) -> float:
    """Gradients of one optimizer step into the method's parameters; returns the summed token loss (a float).

    ``make_artifact``: the method (or its DDP wrapper), called once. ``micro_batches``: ``tasks.Batch`` objects on
    the model's device. ``n_tokens``: N, the target tokens of the global batch. ``grad_scale``: multiplies the
    artifact gradient (the world size under DDP, which averages). ``autocast_dtype``: run the micro-batches under
    ``torch.autocast`` (bf16 on GPU for an fp32 base model). ``checkpoint_layers``: recompute decoder layers in the
    backward pass (memory for time), see ``checkpointing``. ``loss_fn``: ``label_loss_sum`` or ``compiled_loss()``
    (not together with ``checkpoint_layers``: the checkpoint wrappers restore cache state from Python closures).
    """
    if checkpoint_layers and loss_fn not in (label_loss_sum, plain_label_loss_sum):
        raise ValueError("gradient checkpointing and a compiled loss cannot be combined; choose one")
    artifact = make_artifact()
    tensors = artifact.tensors()
    leaves = {k: t.detach().requires_grad_(True) for k, t in tensors.items()}
    leaf_artifact = artifact_from_tensors(kind, leaves)
    device_type = base.device.type
    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    loss_sum = 0.0
    with checkpointing(base) if checkpoint_layers else contextlib.nullcontext():
        for batch in micro_batches:
            with autocast:
                token_loss = loss_fn(base, leaf_artifact, batch)
            (token_loss / n_tokens).backward()
            loss_sum += token_loss.item()
    grads = [leaves[k].grad * grad_scale if leaves[k].grad is not None else torch.zeros_like(leaves[k])
             for k in tensors]
    torch.autograd.backward(list(tensors.values()), grads)
    return loss_sum


__all__ = ["accumulate_step", "compiled_loss", "label_loss_sum", "plain_label_loss_sum"]
