"""Residual prompt tuning (Razdaibiedina et al., ACL Findings 2023): the soft prompt through a shallow MLP with a
skip connection, folded into a plain soft prompt on save.

Math, per virtual token ``i`` (``E_i in R^d`` the trainable embedding, ``m`` the bottleneck)::

    u_i  = W_up · ReLU(W_down · E_i + b_down) + b_up          W_down [m, d], W_up [d, m]
    E'_i = E_i + gamma ⊙ LayerNorm(u_i) + beta                gamma, beta [d]: LayerNorm's gain and shift

Shapes: ``E [P, d]`` -> ``E' [P, d]``. The paper's default MLP is shared by every token (``shared=True``); its
"separate" variant gives each token its own MLP and LayerNorm (``shared=False``: every tensor above gains a leading
``P``). Trainable: ``P*d + G*(2*d*m + m + 3*d)`` with ``G = 1`` shared, ``P`` separate. Artifact:
``SoftPrompt(E')`` ``[P, d]``: the MLP is run once and dropped on materialize, so the saved adapter is an ordinary
soft prompt (served, tabled and exported as PEFT ``PROMPT_TUNING`` like prompt tuning's) at zero serving cost.

What we take from the official code (github.com/arazd/ResidualPrompts, ``ResMLP``): the order Linear -> ReLU ->
Linear -> LayerNorm, the residual added after the LayerNorm, one MLP shared by the tokens. What we change: the
LayerNorm's gain ``gamma`` starts at zero (theirs: one, PyTorch's default), so ``E' = E`` at step 0 and the method
starts exactly where prompt tuning starts from the same init (real-token embeddings). With a gain of one, the
LayerNorm's unit-variance output would be added to embeddings of standard deviation 0.14 (SmolLM2-135M), about seven
times their scale, burying the init. The MLP's weights keep PyTorch's ``nn.Linear`` init, so the branch is not
dead: the first gradient reaches ``gamma`` and ``beta``, and through them the MLP.

Inits: those of prompt tuning (``labels``, ``vocab``, ``text``, ``random``, from the shared start in
``methods/init.py``), which set ``E``. Defaults (docs/DEFAULTS.md): 20 tokens, text init, shared MLP, bottleneck
400 (the official code's default is 800; 400 is below SmolLM2's d = 576), lr in ``default_lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from softprompts.methods.base import PromptMethod
from softprompts.methods.config import MethodConfig
from softprompts.model.artifacts import SoftPrompt
from softprompts.model.frozen import FrozenBase


@dataclass(frozen=True)
class ResidualPromptConfig(MethodConfig):
    """bottleneck: m, the MLP's hidden width; shared: one MLP for every virtual token (the paper's default) or, when
    false, one per token (the paper's "separate" variant, P times the MLP's parameters)."""

    bottleneck: int = 400
    shared: bool = True

    # `softprompts tune` / `compare --tune`: the bottleneck m (a narrow, the default and the official width) and
    # the MLP shared by every token (the paper's default) or one per token (its "separate" variant)
    tunable = {"bottleneck": (100, 400, 800), "shared": (True, False)}

    def errors(self) -> list[str]:
        problems = super().errors()
        if not isinstance(self.bottleneck, int) or isinstance(self.bottleneck, bool) or self.bottleneck < 1:
            problems.append(f"bottleneck must be a positive integer (the paper's MLP: a few hundred), "
                            f"got {self.bottleneck!r}")
        if not isinstance(self.shared, bool):
            problems.append(f"shared must be true or false, got {self.shared!r}")
        return problems


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """``nn.Linear``'s default init: uniform in ``±1/sqrt(fan_in)``, for weights and biases alike."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class ResidualPrompt(PromptMethod):
    name = "residual"
    aliases = ("residual_prompt", "residual-prompt", "residual_prompt_tuning")
    config_class = ResidualPromptConfig
    artifact_kind = SoftPrompt.kind
    default_lr = 3e-2
    peft_type = None  # PEFT has no residual reparameterization; the saved adapter still exports as PROMPT_TUNING

    def init_parameters(self, base: FrozenBase, start: SoftPrompt, from_values: bool) -> None:
        d, m = base.shapes.hidden_size, self.config.bottleneck
        g = 1 if self.config.shared else start.embeds.shape[0]  # G: how many MLPs
        self.embeds = nn.Parameter(start.embeds)  # E: [P, d]
        self.down = _uniform((g, d, m), d)  # W_down^T: [G, d, m]
        self.down_bias = _uniform((g, 1, m), d)  # [G, 1, m]
        self.up = _uniform((g, m, d), m)  # W_up^T: [G, m, d]
        self.up_bias = _uniform((g, 1, d), m)  # [G, 1, d]
        self.gain = nn.Parameter(torch.zeros(g, d))  # gamma: [G, d], zero: E' = E at step 0
        self.shift = nn.Parameter(torch.zeros(g, d))  # beta: [G, d]

    def forward(self) -> SoftPrompt:
        length = self.embeds.shape[0]
        per_token = (length, *self.down.shape[1:])  # the shared MLP is broadcast to every token (a view)
        x = self.embeds.unsqueeze(1)  # [P, 1, d]
        hidden = F.relu(torch.baddbmm(self.down_bias.expand(length, 1, -1), x, self.down.expand(per_token)))
        up = self.up.expand(length, *self.up.shape[1:])  # [P, m, d]
        u = torch.baddbmm(self.up_bias.expand(length, 1, -1), hidden, up).squeeze(1)  # [P, d]
        normed = F.layer_norm(u, (u.shape[-1],))  # [P, d], no affine: gain and shift below
        return SoftPrompt(self.embeds + self.gain * normed + self.shift)  # [P, d]
