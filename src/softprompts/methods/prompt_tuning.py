"""Prompt tuning (Lester, Al-Rfou & Constant, 2021): a trainable soft prompt at the input only.

Math: the model sees ``[E_1, ..., E_P, e(x_1), ..., e(x_T)]`` where ``E in R^{P x d}`` is the only trainable tensor and
``e`` is the frozen embedding. Trainable parameters: ``P * d``. Artifact: ``SoftPrompt(embeds=E)`` of shape ``[P, d]``.

Inits (``MethodConfig.init``): ``labels`` (class-label word embeddings, then sampled vocabulary: Lester's best),
``vocab`` (sampled vocabulary), ``text`` (embeddings of a text, cut to P tokens or left-filled with the end-of-text
token) and ``random`` (normal with the embedding matrix's standard deviation). Starting from real-token embeddings
keeps step 0 close to the model's prior. Defaults (docs/DEFAULTS.md): 20 tokens, text init, lr 3e-2.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from softprompts.methods.base import PromptMethod
from softprompts.methods.config import MethodConfig
from softprompts.model.artifacts import SoftPrompt
from softprompts.model.frozen import FrozenBase


@dataclass(frozen=True)
class PromptTuningConfig(MethodConfig):
    """Prompt tuning has only the shared options (see ``MethodConfig``)."""


class PromptTuning(PromptMethod):
    name = "prompt"
    aliases = ("prompt_tuning",)
    config_class = PromptTuningConfig
    artifact_kind = SoftPrompt.kind
    default_lr = 3e-2
    peft_type = "PROMPT_TUNING"

    def init_parameters(self, base: FrozenBase, start: SoftPrompt, from_values: bool) -> None:
        self.embeds = nn.Parameter(start.embeds)  # E: [P, d]

    def forward(self) -> SoftPrompt:
        return SoftPrompt(self.embeds)

    @classmethod
    def peft_options(cls, config: PromptTuningConfig, hidden_size: int, init_text: str | None = None,
                     tokenizer_path: str | None = None) -> dict:
        if not (init_text and tokenizer_path):
            return {}  # PEFT's random init
        return {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": init_text,  # PEFT's only text init
                "tokenizer_name_or_path": tokenizer_path}
