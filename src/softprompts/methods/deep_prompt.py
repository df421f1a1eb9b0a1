"""Deep prompts (P-tuning v2, Liu et al., 2022): per-layer key/value prefixes trained directly, no MLP.

Math: for every layer ``l`` trainable ``K_l, V_l in R^{H_l x P x D_l}`` enter that layer's attention as extra keys and
values (positions ``0..P-1``). Trainable: ``sum_l 2 * H_l * P * D_l``. Artifact: ``KVPrefix(keys=K, values=V)``.

Init: the KV of a real text (default; the model with that text in front) or scaled random values.
Defaults (docs/DEFAULTS.md): 10 tokens, text init, lr 3e-3.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from softprompts.methods.base import PromptMethod
from softprompts.methods.config import MethodConfig
from softprompts.model.artifacts import KVPrefix
from softprompts.model.frozen import FrozenBase


@dataclass(frozen=True)
class DeepPromptConfig(MethodConfig):
    """Deep prompts have only the shared options (see ``MethodConfig``)."""

    num_virtual_tokens: int = 10


class DeepPrompt(PromptMethod):
    name = "deep"
    aliases = ("deep_prompt", "ptuning_v2", "p-tuning-v2")
    config_class = DeepPromptConfig
    artifact_kind = KVPrefix.kind
    default_lr = 3e-3
    peft_type = "PREFIX_TUNING"

    def init_parameters(self, base: FrozenBase, start: KVPrefix, from_values: bool) -> None:
        self.keys = nn.ParameterList(nn.Parameter(k) for k in start.keys)  # each [H_l, P, D_l]
        self.values = nn.ParameterList(nn.Parameter(v) for v in start.values)

    def forward(self) -> KVPrefix:
        return KVPrefix(list(self.keys), list(self.values))

    @classmethod
    def peft_options(cls, config: DeepPromptConfig, hidden_size: int, init_text=None, tokenizer_path=None) -> dict:
        return {"prefix_projection": False}  # PEFT's prefix tuning without its MLP is P-tuning v2
