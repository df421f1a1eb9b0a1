"""DePT, decomposed prompt tuning (Shi & Lipani, ICLR 2024): a shorter soft prompt plus a low-rank offset added to
the input embeddings of the prompt's first ``S`` real tokens, trained with two learning rates.

Math, for a prompt ``x_1..x_T`` (its real tokens, counted from the first after the virtual positions)::

    model input = [E_1, ..., E_P, e(x_1) + (A·B)_1, ..., e(x_k) + (A·B)_k, e(x_k+1), ..., e(x_T), targets...]
    k = min(S, T)                      E [P, d], A [S, r], B [r, d]

Targets and generated tokens never get an offset (the injection point stops at each row's prompt length), so
training, scoring and generation read the same input. Trainable: ``P*d + r*(S + d)``. Artifact: ``OffsetPrompt``
(``model/artifacts.py``): the soft prompt ``E`` and the two factors, saved as they are (``[S, d]`` is computed on
use). On a decoder-only base the soft prompt is served as its KV, computed once per adapter, like any soft prompt.

Init (LoRA's start): ``A`` uniform in ``±1/sqrt(S)``, ``B`` zero, so ``A·B = 0`` at step 0 and the
method starts exactly where prompt tuning starts from the same init (which sets ``E``); the first gradient reaches
``B`` (``dL/dB = A^T dL/d(A·B)``), then ``A``. Two learning rates (``parameter_groups``): the soft prompt's ``lr``
and the offsets' ``lr * offset_lr_ratio`` (the paper tunes the two separately, the pair's far below the prompt's, over
tens of thousands of steps; our runs are a few hundred, so the pair's rate is a ratio of the prompt's: 0.1, where 1.0
failed on sentiment, docs/DEFAULTS.md row 18).

Defaults (docs/DEFAULTS.md rows 16-18: provisional, one task and seed): 10 virtual tokens and rank 8 at ``S = 256``:
``10*576 + 8*(256+576) = 12,416`` parameters on SmolLM2-135M (d = 576), about prompt tuning's 20 tokens (11,520), the
paper's trade of prompt length for a low-rank update at the same budget. PEFT has no DePT (``peft_type = None``):
export refuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from softprompts.methods.base import PromptMethod
from softprompts.methods.config import MethodConfig, MethodError
from softprompts.model.artifacts import EmbeddingOffsets, OffsetPrompt, SoftPrompt
from softprompts.model.frozen import FrozenBase


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class DeptConfig(MethodConfig):
    """rank: r, the rank of the offsets ``A·B``; offset_positions: S, how many of the prompt's first real tokens get
    an offset (the paper's maximum input length, 256); offset_lr_ratio: the offsets' learning rate over the soft
    prompt's (``--lr``)."""

    num_virtual_tokens: int = 10
    rank: int = 8
    offset_positions: int = 256
    offset_lr_ratio: float = 0.1

    # `softprompts tune` / `compare --tune`: the rank (half, the default, double) and the offsets' learning rate as
    # a ratio of the prompt's (the paper's two rates are 3 orders apart at 100x our steps; 1.0 failed, DEFAULTS.md)
    tunable = {"rank": (4, 8, 16), "offset_lr_ratio": (0.01, 0.03, 0.1, 0.3)}

    def errors(self) -> list[str]:
        problems = super().errors()
        if not _positive_int(self.rank):
            problems.append(f"rank must be a positive integer (the paper: a few to a few tens), got {self.rank!r}")
        if not _positive_int(self.offset_positions):
            problems.append(f"offset_positions must be a positive integer (how many prompt tokens get an offset; "
                            f"the paper: 256), got {self.offset_positions!r}")
        ratio = self.offset_lr_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not math.isfinite(ratio) or ratio <= 0:
            problems.append(f"offset_lr_ratio must be a finite positive number (the offsets' learning rate over the "
                            f"prompt's), got {ratio!r}")
        return problems


class Dept(PromptMethod):
    name = "dept"
    aliases = ("decomposed_prompt", "decomposed-prompt", "decomposed_prompt_tuning")
    config_class = DeptConfig
    artifact_kind = OffsetPrompt.kind
    default_lr = 3e-2
    peft_type = None  # PEFT has no DePT (only forks do); its soft prompt alone would drop the offsets
    compared_by_default = False  # one provisional measurement (docs/DEFAULTS.md rows 16-18): not chosen yet

    def init_parameters(self, base: FrozenBase, start: SoftPrompt | OffsetPrompt, from_values: bool) -> None:
        s, r, d = self.config.offset_positions, self.config.rank, base.shapes.hidden_size
        self.embeds = nn.Parameter(start.embeds)  # E: [P, d]
        if isinstance(start, OffsetPrompt):  # continuing a saved DePT adapter: its factors exactly
            saved = (start.offsets.positions, int(start.offsets.a.shape[1]))
            if saved != (s, r):
                raise MethodError(f"the saved adapter's offsets have offset_positions {saved[0]} and rank "
                                  f"{saved[1]}; continue it with those (got {s} and {r})")
            self.a = nn.Parameter(start.offsets.a.detach().float().cpu().clone())  # A: [S, r]
            self.b = nn.Parameter(start.offsets.b.detach().float().cpu().clone())  # B: [r, d]
            return
        bound = 1.0 / math.sqrt(s)
        self.a = nn.Parameter(torch.empty(s, r).uniform_(-bound, bound))  # A: [S, r]
        self.b = nn.Parameter(torch.zeros(r, d))  # B: [r, d], zero: A·B = 0 at step 0

    def forward(self) -> OffsetPrompt:
        return OffsetPrompt(SoftPrompt(self.embeds), EmbeddingOffsets(self.a, self.b))

    def parameter_groups(self, lr: float) -> list[dict]:
        """The soft prompt at ``lr``, the low-rank pair at ``lr * offset_lr_ratio``."""
        return [{"params": [self.embeds], "lr": lr},
                {"params": [self.a, self.b], "lr": lr * self.config.offset_lr_ratio}]
