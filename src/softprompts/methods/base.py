"""What every method shares: a frozen config dataclass and a module that materializes into an artifact.

A method is a ``torch.nn.Module`` whose ``forward()`` returns its artifact (a ``SoftPrompt`` or a ``KVPrefix``) built
from its trainable parameters, differentiably. ``materialize()`` returns the same artifact detached: what is saved and
served (reparameterization encoders are run once and dropped). Trainable parameters are exactly
``self.parameters()``: methods declare them by owning them, nothing is matched by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from softprompts.model.artifacts import Artifact
from softprompts.model.base import BaseModel

INITS = ("random", "vocab", "text", "labels")


@dataclass(frozen=True)
class MethodConfig:
    """Options every method has.

    num_virtual_tokens: P, the number of virtual positions (Lester et al.: gains are marginal beyond ~20).
    init: how the virtual tokens start: ``random``, ``vocab`` (sampled vocabulary embeddings), ``text`` (the
        embeddings, or for prefixes the KV, of ``init_text`` cycled to P tokens) or ``labels`` (class-label words
        first, Lester's best, then sampled vocabulary).
    init_text: the text for ``init="text"``.
    seed: seeds the random parts of initialization.
    """

    num_virtual_tokens: int = 20
    init: str = "text"
    init_text: str | None = None
    seed: int = 0

    allowed_inits: ClassVar[tuple[str, ...]] = INITS

    def errors(self) -> list[str]:
        """Every problem with this config at once, each with what to do about it."""
        problems = []
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            problems.append(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.init not in self.allowed_inits:
            problems.append(f"init must be one of {', '.join(self.allowed_inits)}, got {self.init!r}")
        return problems

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_options(cls, **options) -> MethodConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(sorted(known))}")
        config = cls(**options)
        problems = config.errors()
        if problems:
            raise ValueError(f"invalid {cls.__name__}: " + "; ".join(problems))
        return config


class PromptMethod(nn.Module):
    """Base class: subclasses set ``name``, ``config_class``, ``artifact_kind`` and implement ``forward``."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    artifact_kind: ClassVar[str]  # "soft_prompt" or "kv_prefix"

    def __init__(self, base: BaseModel, config: MethodConfig) -> None:
        super().__init__()
        self.config = config
        self.base_dtype = base.dtype

    def forward(self) -> Artifact:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def materialize(self) -> Artifact:
        """The artifact to save and serve: detached, in the base model's dtype, encoders dropped."""
        return self().detached(self.base_dtype)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
