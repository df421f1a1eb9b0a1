"""Prefix tuning (Li & Liang, 2021): trainable keys and values at every layer, through a reparameterization MLP.

Math: trainable ``P' in R^{P x e}``; ``MLP(P') = W_2 tanh(W_1 P' + b_1) + b_2`` in ``R^{P x S}`` with
``S = sum_l 2 * H_l * D_l`` (per-layer key/value heads and head dims as probed, so GQA is exact). The prefix is
``KV = KV_0 + MLP(P')`` split per layer into keys ``[H_l, P, D_l]`` and values ``[H_l, P, D_l]``.

``KV_0`` is a fixed buffer: the KV of a real text (``init="text"``/``"labels"``/``"vocab"``, Li & Liang: real-word
init matters in low data) or zero (``init="random"``, the paper's plain MLP init). With a real-text ``KV_0`` the last
MLP layer starts at zero, so step 0 equals the model with that text in front rather than a random prefix (PEFT's
default start, which DATA.md measured far below the bare model). Directly optimizing the prefix is unstable
(paper, Sec. 4.3), which is why the MLP is the default; ``projection=False`` trains ``KV`` directly instead.

Trainable: ``P*e + e*h + h + h*S + S`` (``P*S`` without projection). Artifact: ``KVPrefix``; the MLP and ``KV_0``
are folded into the saved tensors and dropped. Defaults (docs/DEFAULTS.md): 10 tokens, text init, lr 3e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from softprompts.methods.base import PromptMethod
from softprompts.methods.config import MethodConfig
from softprompts.model.artifacts import KVPrefix
from softprompts.model.frozen import FrozenBase


@dataclass(frozen=True)
class PrefixTuningConfig(MethodConfig):
    """projection: train through the MLP (True) or the KV directly; projection_dim: e; projection_hidden: h."""

    num_virtual_tokens: int = 10
    projection: bool = True
    projection_dim: int = 512
    projection_hidden: int = 512

    tunable = {"projection_hidden": (128, 256, 512)}  # `softprompts tune`: the MLP's hidden size h

    def errors(self) -> list[str]:
        problems = super().errors()
        if self.projection_dim < 1 or self.projection_hidden < 1:
            problems.append("projection_dim and projection_hidden must be positive")
        return problems


def flatten_prefix(prefix: KVPrefix) -> torch.Tensor:
    """``KVPrefix -> [P, S]``: per layer keys then values, each ``[H_l, P, D_l] -> [P, H_l * D_l]``."""
    parts = []
    for k, v in zip(prefix.keys, prefix.values, strict=True):
        parts += [k.permute(1, 0, 2).flatten(1), v.permute(1, 0, 2).flatten(1)]
    return torch.cat(parts, dim=1)


def unflatten_prefix(flat: torch.Tensor, kv_heads, head_dims) -> KVPrefix:
    """Inverse of ``flatten_prefix``: ``[P, S] -> KVPrefix`` with keys/values ``[H_l, P, D_l]``."""
    keys, values, offset = [], [], 0
    length = flat.shape[0]
    for heads, dim in zip(kv_heads, head_dims, strict=True):
        size = heads * dim
        keys.append(flat[:, offset : offset + size].reshape(length, heads, dim).permute(1, 0, 2))
        values.append(flat[:, offset + size : offset + 2 * size].reshape(length, heads, dim).permute(1, 0, 2))
        offset += 2 * size
    return KVPrefix(keys, values)


class PrefixTuning(PromptMethod):
    name = "prefix"
    aliases = ("prefix_tuning",)
    config_class = PrefixTuningConfig
    artifact_kind = KVPrefix.kind
    default_lr = 3e-4
    peft_type = "PREFIX_TUNING"

    def init_parameters(self, base: FrozenBase, start: KVPrefix, from_values: bool) -> None:
        config = self.config
        self.kv_heads, self.head_dims = base.shapes.kv_heads, base.shapes.head_dims
        flat = flatten_prefix(start)  # [P, S]
        if not config.projection:
            self.prefix = nn.Parameter(flat)
            self.mlp = None
            return
        self.register_buffer("start", flat if from_values else torch.zeros_like(flat))
        self.inputs = nn.Parameter(torch.randn(config.num_virtual_tokens, config.projection_dim))  # P': [P, e]
        self.mlp = nn.Sequential(
            nn.Linear(config.projection_dim, config.projection_hidden),
            nn.Tanh(),
            nn.Linear(config.projection_hidden, flat.shape[1]),
        )
        if from_values:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self) -> KVPrefix:
        flat = self.prefix if self.mlp is None else self.start + self.mlp(self.inputs)  # [P, S]
        return unflatten_prefix(flat, self.kv_heads, self.head_dims)

    @classmethod
    def peft_options(cls, config: PrefixTuningConfig, hidden_size: int, init_text=None,
                     tokenizer_path=None) -> dict:
        return {"prefix_projection": config.projection, "encoder_hidden_size": config.projection_hidden}
