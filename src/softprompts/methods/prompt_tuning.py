"""Prompt tuning (Lester, Al-Rfou & Constant, 2021): a trainable soft prompt at the input only.

Math: the model sees ``[E_1, ..., E_P, e(x_1), ..., e(x_T)]`` where ``E in R^{P x d}`` is the only trainable tensor and
``e`` is the frozen embedding. Trainable parameters: ``P * d``. Artifact: ``SoftPrompt(embeds=E)`` of shape ``[P, d]``.

Inits (``MethodConfig.init``): ``labels`` (class-label word embeddings, then sampled vocabulary: Lester's best),
``vocab`` (sampled vocabulary), ``text`` (embeddings of a text, cycled to P tokens) and ``random`` (normal with the
embedding matrix's standard deviation). Starting from real-token embeddings keeps step 0 close to the model's prior.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from softprompts.methods.base import MethodConfig, PromptMethod
from softprompts.methods.init import initial_embeddings
from softprompts.model.artifacts import SoftPrompt
from softprompts.model.base import BaseModel


@dataclass(frozen=True)
class PromptTuningConfig(MethodConfig):
    """Prompt tuning has only the shared options (see ``MethodConfig``)."""


class PromptTuning(PromptMethod):
    name = "prompt"
    config_class = PromptTuningConfig
    artifact_kind = SoftPrompt.kind

    def __init__(self, base: BaseModel, config: PromptTuningConfig, labels=None, init_text=None, init_artifact=None) -> None:
        super().__init__(base, config)
        self.embeds = nn.Parameter(initial_embeddings(base, config, labels, init_text, init_artifact))  # [P, d]

    def forward(self) -> SoftPrompt:
        return SoftPrompt(self.embeds)
