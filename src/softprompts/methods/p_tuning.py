"""P-tuning (Liu et al., 2021, "GPT Understands, Too"): a soft prompt produced by a prompt encoder.

Math: trainable ``H in R^{P x d}`` goes through an encoder ``f`` (an MLP, or a bidirectional LSTM followed by an MLP
as in the paper) and the soft prompt is ``E = H + f(H)``. We add the residual connection and zero-initialize the last
layer of ``f`` (as in Residual Prompt Tuning, Razdaibiedina et al. 2023), so at step 0 ``E = H`` equals a real-token
initialization instead of the random output of an untrained encoder; the encoder still shapes every update.

Shapes: ``H [P, d]`` -> MLP: ``d -> h -> h -> d`` (ReLU); LSTM: ``[1, P, d] -> [1, P, 2 * (h // 2)]`` then
``h -> d``. Trainable: ``P*d + |f|``. Artifact: ``SoftPrompt(E)`` ``[P, d]``, the encoder is dropped on materialize.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from softprompts.methods.base import MethodConfig, PromptMethod
from softprompts.methods.init import initial_embeddings
from softprompts.model.artifacts import SoftPrompt
from softprompts.model.base import BaseModel


@dataclass(frozen=True)
class PTuningConfig(MethodConfig):
    """encoder: ``mlp`` or ``lstm``; encoder_hidden: h (0 = the model's hidden size d)."""

    encoder: str = "mlp"
    encoder_hidden: int = 0

    def errors(self) -> list[str]:
        problems = super().errors()
        if self.encoder not in ("mlp", "lstm"):
            problems.append(f"encoder must be 'mlp' or 'lstm', got {self.encoder!r}")
        if self.encoder_hidden < 0:
            problems.append(f"encoder_hidden must be >= 0 (0 = model hidden size), got {self.encoder_hidden}")
        return problems


class PTuning(PromptMethod):
    name = "ptuning"
    config_class = PTuningConfig
    artifact_kind = SoftPrompt.kind

    def __init__(self, base: BaseModel, config: PTuningConfig, labels=None, init_text=None, init_artifact=None) -> None:
        super().__init__(base, config)
        d = base.shapes.hidden_size
        h = config.encoder_hidden or d
        torch.manual_seed(config.seed)
        self.inputs = nn.Parameter(initial_embeddings(base, config, labels, init_text, init_artifact))  # H: [P, d]
        if config.encoder == "lstm":
            self.lstm = nn.LSTM(d, max(1, h // 2), num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Sequential(nn.Linear(2 * max(1, h // 2), h), nn.ReLU(), nn.Linear(h, d))
        else:
            self.lstm = None
            self.head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self) -> SoftPrompt:
        hidden = self.inputs
        if self.lstm is not None:
            hidden = self.lstm(hidden.unsqueeze(0))[0].squeeze(0)  # [P, 2 * (h // 2)]
        return SoftPrompt(self.inputs + self.head(hidden))  # [P, d]
