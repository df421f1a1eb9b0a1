"""Measure a model's cache layout instead of guessing it from config keys.

One tiny cached forward (``[1, 2]`` token ids) tells, per layer ``l``, the number of key/value heads ``H_l`` and the
head dim ``D_l`` (cache tensors are ``[batch, H_l, T, D_l]``), plus the dtype. That covers GQA/MQA, per-layer head
sizes and models whose config names these fields differently. It also reads which forward keyword takes the cache:
transformers 5.24 renamed ``past_key_values`` to ``cache`` (5.23 rejects ``cache``), so we look at the signature.
A second tiny forward tells whether the logits are exactly the output embedding applied to the decoder's last hidden
state (``probe_plain_head``): true for Llama, Qwen2, GPT-2 and Gemma3 as configured by default, false where the causal
LM transforms them further (final-logit soft-capping, logit scaling).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass(frozen=True)
class ModelShapes:
    """What an adapter must agree with to run on a model."""

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    kv_heads: tuple[int, ...]  # H_l per layer
    head_dims: tuple[int, ...]  # D_l per layer
    dtype: str
    # encoder-decoder models: the first `encoder_layers` KV layers are the encoder's self-attention, then the
    # decoder's self-attention and cross-attention layers (model/encoder_decoder/forward.py); 0 for decoder-only models
    encoder_layers: int = 0

    def _data(self) -> dict:
        data = asdict(self)
        if not self.encoder_layers:
            data.pop("encoder_layers")  # decoder-only shapes (and their fingerprints) as before the field existed
        return data

    def fingerprint(self) -> str:
        """Stable hash of the shapes an adapter depends on (dtype excluded: an adapter may run in bf16 or fp32)."""
        data = self._data()
        data.pop("dtype")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {**self._data(), "kv_heads": list(self.kv_heads), "head_dims": list(self.head_dims)}

    @classmethod
    def from_json(cls, data: dict) -> ModelShapes:
        return cls(**{**data, "kv_heads": tuple(data["kv_heads"]), "head_dims": tuple(data["head_dims"])})


def cache_keyword(model: PreTrainedModel) -> str:
    """The forward keyword (and output attribute) that carries the KV cache for this transformers version."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(
        f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`; cannot inject a KV prefix")


def new_cache(model: PreTrainedModel) -> DynamicCache:
    """An empty cache laid out for ``model`` (sliding-window layers where the config has them)."""
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signatures
        return DynamicCache()


@torch.no_grad()
def probe_shapes(model: PreTrainedModel) -> ModelShapes:
    """Run one cached forward of two tokens and read the per-layer key/value shapes from the cache."""
    device = next(model.parameters()).device
    keyword = cache_keyword(model)
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    out = model(input_ids=ids, use_cache=True, **{keyword: new_cache(model)})
    cache = getattr(out, keyword)
    heads, dims = [], []
    for layer in cache.layers:
        keys = layer.keys  # [1, H_l, 2, D_l]
        heads.append(int(keys.shape[1]))
        dims.append(int(keys.shape[-1]))
    embeddings = model.get_input_embeddings().weight
    return ModelShapes(
        model_type=str(getattr(model.config, "model_type", type(model).__name__)),
        num_layers=len(heads),
        hidden_size=int(embeddings.shape[1]),
        vocab_size=int(embeddings.shape[0]),
        kv_heads=tuple(heads),
        head_dims=tuple(dims),
        dtype=str(embeddings.dtype).removeprefix("torch."),
    )


@torch.no_grad()
def probe_plain_head(model: PreTrainedModel) -> bool:
    """Whether training may project hidden states with the head's weight itself (``model/head_loss.py``).

    True when the head is a plain ``nn.Linear`` (not a quantized subclass) with no forward hooks (accelerate's
    offloading hooks load the weight in the hook: the bare ``weight`` is then a placeholder), its weight is real (not
    ``meta``), the model sits on ONE device (``device_map`` over several leaves the last hidden state elsewhere), and
    ``logits == head(base_model(x).last_hidden_state)`` bit for bit on a short input (false where the causal LM
    transforms the logits further: final-logit soft-capping, scaling). Otherwise training keeps HF's own head.
    """
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or model.base_model is model:
        return False
    if head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook") or head.weight.is_meta:
        return False
    if len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1:
        return False
    device = model.get_input_embeddings().weight.device
    if head.weight.device != device:
        return False
    vocab = head.weight.shape[0]
    ids = torch.arange(3, dtype=torch.long, device=device).mul(vocab // 3 + 1).remainder(vocab)[None]  # [1, 3]
    logits = model(input_ids=ids, use_cache=False).logits
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    return bool(torch.equal(logits, head(hidden)))
