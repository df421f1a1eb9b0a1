"""Deep prompts (P-tuning v2, Liu et al., 2022): per-layer key/value prefixes trained directly, no MLP.

Math: for every layer ``l`` trainable ``K_l, V_l in R^{H_l x P x D_l}`` enter that layer's attention as extra keys and
values (positions ``0..P-1``). Trainable: ``sum_l 2 * H_l * P * D_l``. Artifact: ``KVPrefix(keys=K, values=V)``.

Init: the KV of a real text (default; the model with that text in front) or scaled random values.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from softprompts.methods.base import MethodConfig, PromptMethod
from softprompts.methods.init import initial_prefix
from softprompts.model.artifacts import KVPrefix
from softprompts.model.base import BaseModel


@dataclass(frozen=True)
class DeepPromptConfig(MethodConfig):
    """Deep prompts have only the shared options (see ``MethodConfig``)."""


class DeepPrompt(PromptMethod):
    name = "deep"
    config_class = DeepPromptConfig
    artifact_kind = KVPrefix.kind

    def __init__(self, base: BaseModel, config: DeepPromptConfig, labels=None, init_text=None, init_artifact=None) -> None:
        super().__init__(base, config)
        start = initial_prefix(base, config, labels, init_text, init_artifact)
        self.keys = nn.ParameterList(nn.Parameter(k) for k in start.keys)  # each [H_l, P, D_l]
        self.values = nn.ParameterList(nn.Parameter(v) for v in start.values)

    def forward(self) -> KVPrefix:
        return KVPrefix(list(self.keys), list(self.values))
