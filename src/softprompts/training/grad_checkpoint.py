"""Gradient checkpointing of the frozen base's decoder layers, for EVERY method (KV prefixes included).

Inside ``checkpointing(base)`` each decoder layer recomputes its activations in the backward pass instead of keeping
them (less activation memory, one more forward of each layer; the same gradients).

HF's own switch cannot be used here: it only acts in ``train()`` mode (our base model is frozen in eval mode) and it
drops the cache (the KV prefix) when active, which is why PEFT refuses prefix tuning with checkpointing. We wrap each
decoder layer's ``forward`` in a non-reentrant ``torch.utils.checkpoint`` and, because a layer APPENDS its
keys/values to the cache, the cache's per-layer state is snapshotted before the layer runs and restored before the
backward replay, so the replay sees exactly the prefix the forward saw. Nothing else about the model changes and the
wrappers are removed on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Cache


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated decoder blocks: the first ``ModuleList`` with ``num_hidden_layers`` entries."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count:
            return list(module)
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__} (a ModuleList of {count} blocks)")


def _find_cache(args: tuple, kwargs: dict) -> Cache | None:
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)


def _checkpointed(original: Callable) -> Callable:
    """``original`` (a decoder layer's bound forward) under non-reentrant checkpointing, cache state restored."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        cache = _find_cache(args, kwargs)
        snapshot = [dict(layer.__dict__) for layer in cache.layers] if cache is not None else None

        def replay(*inner_args):
            if snapshot is not None:  # the replay must see the cache as the forward did (prefix only, no appends)
                for layer, state in zip(cache.layers, snapshot, strict=True):
                    layer.__dict__.clear()
                    layer.__dict__.update(state)
            return original(*inner_args, **kwargs)

        return checkpoint(replay, *args, use_reentrant=False)

    return run


@contextlib.contextmanager
def checkpointing(base) -> Iterator[None]:
    """Within the block, every decoder layer of ``base.model`` recomputes its activations in the backward pass.

    Works with soft prompts and KV prefixes alike (see the module docstring). Backward passes must run inside the
    block too when they replay cache updates (``accumulate_step`` does both inside it).
    """
    layers = decoder_layers(base.model)
    for layer in layers:
        layer.forward = _checkpointed(layer.forward)  # instance attribute shadows the class method
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


__all__ = ["checkpointing", "decoder_layers"]
