"""Composition: KV-prefix adapters (cartridges above all) concatenated into one, with no retraining.

For adapters ``A_1..A_n`` with per-layer ``K^(i)_l [H_l, P_i, D_l]`` (and ``V``)::

    K_l = cat(K^(1)_l, ..., K^(n)_l, dim=positions)          [H_l, P_1 + ... + P_n, D_l]

so the composed adapter is exactly the prefixes side by side (Eyuboglu et al. 2025: cartridges trained separately
compose this way). Each part keeps the keys it was trained with (positions are baked into keys by RoPE), so what the
model reads is not a retrained whole: measure the composition on your questions (``softprompts eval``).

Rules: every part holds a KV prefix (a soft prompt has no KV until a base model computes it: train a cartridge or a
prefix); every part fits the first one's base model (``check_base_fits``: other shapes refused, other weights
warned). The composed adapter records the parts' method when they share one (else ``deep``: a KV prefix trained
directly), the first part's task, and the total length.
"""

from __future__ import annotations

import torch

from softprompts.adapter import Adapter, AdapterError, check_base_fits
from softprompts.methods import method_class
from softprompts.model.artifacts import KVPrefix


def compose(adapters: list[Adapter], names: list[str] | None = None) -> Adapter:
    """One adapter whose KV prefix is ``adapters``' prefixes concatenated in order (module docstring); ``names``
    label the parts in errors (default ``part 1``, ``part 2``, ...)."""
    names = names or [f"part {i + 1}" for i in range(len(adapters))]
    if len(adapters) < 2:
        raise AdapterError("compose needs at least two adapters")
    first = adapters[0]
    for name, adapter in zip(names, adapters, strict=True):
        if not isinstance(adapter.artifact, KVPrefix):
            raise AdapterError(f"{name} holds a soft prompt ({adapter.method}); compose concatenates KV prefixes "
                               "(cartridge, prefix, deep)")
        check_base_fits(name, adapter.base_record, first.base_record, where=f"{names[0]}'s base model")
    dtype = first.artifact.keys[0].dtype
    parts = [a.artifact.to(first.artifact.keys[0].device, dtype) for a in adapters]
    artifact = KVPrefix([torch.cat([p.keys[layer] for p in parts], dim=1) for layer in range(parts[0].num_layers)],
                        [torch.cat([p.values[layer] for p in parts], dim=1) for layer in range(parts[0].num_layers)])
    methods = {a.method for a in adapters}
    method = first.method if len(methods) == 1 else "deep"
    config = dict(first.method_config) if len(methods) == 1 else method_class("deep").config_class().to_json()
    config["num_virtual_tokens"] = artifact.length
    return Adapter(artifact=artifact, method=method, method_config=config, base_name=first.base_name,
                   base_shapes=first.base_shapes, base_weights_fingerprint=first.base_weights_fingerprint,
                   task=first.task)


__all__ = ["compose"]
