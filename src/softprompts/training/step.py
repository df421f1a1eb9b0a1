"""The training step: the summed target-token loss of a micro-batch and the gradient of one optimizer step.

One optimizer step (``loop.train`` calls ``accumulate_step``; see its docstring for the math)::

    A  = method()                       # once per optimizer step: prefix MLP / P-tuning encoder run once
    A' = detach(A) as leaves            # every micro-batch backprops into A' only
    loss_m = CE(LM head at label positions only) / N ;  loss_m.backward()
    A.backward(A'.grad * grad_scale)    # one exact backward through the method

The loss is the base model's (``FrozenBase.label_loss_sum``): on a decoder-only base the LM head + cross-entropy run
fused and chunked where the head is plain (``model/head_loss.py``: the gradient to the hidden states is formed in the
forward pass, so no ``[rows, vocab]`` logits live until the backward pass).

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

from softprompts.model.artifacts import artifact_from_tensors
from softprompts.training.config import TrainConfig
from softprompts.training.grad_checkpoint import checkpointing


def label_loss_sum(base, artifact, batch) -> torch.Tensor:
    """The summed target-token loss of one micro-batch: the base model's family answers it (``base.label_loss_sum``:
    decoder-only ``model/decoder/score.py``, the head fused and chunked where it is plain; encoder-decoder
    ``model/encoder_decoder/score.py``)."""
    return base.label_loss_sum(artifact, batch)


def plain_label_loss_sum(base, artifact, batch) -> torch.Tensor:
    """The family's traceable loss (``FrozenBase.plain_label_loss_sum``): what ``compiled_loss`` compiles."""
    return base.plain_label_loss_sum(artifact, batch)


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


def loss_for(config: TrainConfig) -> Callable:
    """The micro-batch loss, chosen once per run: ``compiled_loss()`` under ``compile``, else ``label_loss_sum``
    (that the two do not meet gradient checkpointing is ``TrainConfig.validate``'s to say)."""
    return compiled_loss() if config.compile else label_loss_sum


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
    (not together with ``checkpoint_layers``, which ``TrainConfig.validate`` refuses: the checkpoint wrappers restore
    cache state from Python closures).
    """
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


__all__ = ["accumulate_step", "compiled_loss", "label_loss_sum", "loss_for", "plain_label_loss_sum"]
