"""Cartridges (Eyuboglu et al. 2025, arXiv 2506.06266): a KV prefix that stands in for a long document.

Math: a deep prompt (per-layer ``K_l, V_l in R^{H_l x P x D_l}`` trained directly) whose first ``F`` positions are
frozen at their initial values (an attention sink: the paper's "freeze the first token")::

    K_l = cat(K_l^frozen [H_l, F, D_l], K_l^trained [H_l, P - F, D_l])      (the same for V_l)

Trainable: ``sum_l 2 * H_l * (P - F) * D_l``. Artifact: ``KVPrefix`` (served, saved, tabled, composed like any).

Init: the KV of the corpus's own first ``P`` tokens (``init_text`` = the corpus as the model reads it; the
self-study run passes it, ``training/self_study.py``), so the frozen first token is the real KV of the corpus's first
token at position 0. The recipe that makes it stand in for the document is the data, not the module: self-study
conversations about the corpus and context distillation (``training/self_study.py``). Trained on ordinary labelled
rows it is a deep prompt with a frozen sink.

Defaults (docs/DEFAULTS.md): 128 virtual tokens, the first frozen, text init, lr 2e-2 (the paper's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from softprompts.methods.config import MethodConfig
from softprompts.methods.deep_prompt import DeepPrompt
from softprompts.model.artifacts import KVPrefix
from softprompts.model.frozen import FrozenBase


@dataclass(frozen=True)
class CartridgeConfig(MethodConfig):
    """frozen_tokens: F, the leading virtual positions kept at their initial KV (0 trains them all)."""

    num_virtual_tokens: int = 128
    frozen_tokens: int = 1

    def errors(self) -> list[str]:
        problems = super().errors()
        if not isinstance(self.frozen_tokens, int) or self.frozen_tokens < 0:
            problems.append(f"frozen_tokens must be an integer >= 0, got {self.frozen_tokens!r}")
        elif isinstance(self.num_virtual_tokens, int) and self.frozen_tokens >= self.num_virtual_tokens:
            problems.append(f"frozen_tokens ({self.frozen_tokens}) must be below num_virtual_tokens "
                            f"({self.num_virtual_tokens}): something has to train")
        return problems


class Cartridge(DeepPrompt):
    name = "cartridge"
    aliases = ("cartridges",)
    config_class = CartridgeConfig
    default_lr = 2e-2
    compared_by_default = False  # its recipe needs a corpus (train --corpus), not the task's labelled rows

    def init_parameters(self, base: FrozenBase, start: KVPrefix, from_values: bool) -> None:
        frozen = self.config.frozen_tokens
        for layer, (k, v) in enumerate(zip(start.keys, start.values, strict=True)):  # each [H_l, P, D_l]
            self.register_buffer(f"frozen_keys_{layer}", k[:, :frozen].clone())
            self.register_buffer(f"frozen_values_{layer}", v[:, :frozen].clone())
        self.num_layers = len(start.keys)
        self.keys = nn.ParameterList(nn.Parameter(k[:, frozen:].clone()) for k in start.keys)
        self.values = nn.ParameterList(nn.Parameter(v[:, frozen:].clone()) for v in start.values)

    def forward(self) -> KVPrefix:
        keys = [torch.cat([getattr(self, f"frozen_keys_{layer}"), k], dim=1) for layer, k in enumerate(self.keys)]
        values = [torch.cat([getattr(self, f"frozen_values_{layer}"), v], dim=1)
                  for layer, v in enumerate(self.values)]
        return KVPrefix(keys, values)
