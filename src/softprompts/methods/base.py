"""What every method shares: a module that starts from an artifact, materializes into one, and registers itself.

A method is a ``torch.nn.Module`` whose ``forward()`` returns its artifact (a ``SoftPrompt``, a ``KVPrefix`` or an
``OffsetPrompt``) built from its trainable parameters, differentiably. ``materialize()`` returns the same artifact
detached: what is saved and served (reparameterization encoders are run once and dropped). Trainable parameters are
exactly ``self.parameters()``: methods declare them by owning them, nothing is matched by name.

A method file declares everything about its method on the subclass, and the subclass registers itself by being
defined (``REGISTRY``, read through ``methods.METHODS``)::

    class MyMethod(PromptMethod):
        name = "mine"                        # what --method and adapter.json say
        aliases = ("my_method",)             # other accepted spellings
        config_class = MyMethodConfig        # its options; field defaults = the measured defaults
        artifact_kind = SoftPrompt.kind      # or KVPrefix.kind, OffsetPrompt.kind
        default_lr = 3e-2                    # measured (docs/DEFAULTS.md)
        peft_type = "PROMPT_TUNING"          # its Hugging Face PEFT counterpart (None: there is none)

        def init_parameters(self, base, start, from_values): ...   # own the trainable tensors, starting at `start`
        def forward(self): ...                                      # -> the artifact

The base class does the shared start: class labels, the init text and continuing a saved artifact
(``methods/init.py``) give ``start``, and ``init_parameters`` runs under ``seeded(config.seed)``, so building a
method is deterministic and never changes the caller's random state.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from softprompts.methods.config import MethodConfig, MethodError
from softprompts.methods.init import initial_artifact, seeded
from softprompts.model.artifacts import Artifact
from softprompts.model.frozen import FrozenBase
from softprompts.model.generation import ContextLengthError

REGISTRY: dict[str, type[PromptMethod]] = {}  # name -> class, in definition order
ALIASES: dict[str, str] = {}  # alias -> name


class PromptMethod(nn.Module):
    """Base class: subclasses declare the class attributes below and implement ``init_parameters`` and ``forward``."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    config_class: ClassVar[type[MethodConfig]]
    artifact_kind: ClassVar[str]  # "soft_prompt", "kv_prefix" or "offset_prompt"
    default_lr: ClassVar[float]
    peft_type: ClassVar[str | None] = None
    compared_by_default: ClassVar[bool] = True  # `compare` trains it unless --methods names others

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            return  # an intermediate base class, not a method
        for key in (cls.name, *cls.aliases):
            if key in REGISTRY or key in ALIASES:
                raise TypeError(f"method name {key!r} of {cls.__name__} is already registered")
        REGISTRY[cls.name] = cls
        ALIASES.update(dict.fromkeys(cls.aliases, cls.name))

    def __init__(self, base: FrozenBase, config: MethodConfig, labels: list[str] | None = None,
                 init_text: str | None = None, init_artifact: Artifact | None = None) -> None:
        super().__init__()
        try:  # before anything of that size is allocated: one real token must still fit
            base.check_fits(1, config.num_virtual_tokens, 0)
        except ContextLengthError:
            raise MethodError(f"num_virtual_tokens {config.num_virtual_tokens} leaves no room for real tokens in the "
                              f"model's context of {base.context_limit} tokens; use far fewer (20 is typical)"
                              ) from None
        self.config = config
        self.base_dtype = base.dtype
        start = initial_artifact(base, config, self.artifact_kind, labels, init_text, init_artifact)
        with seeded(config.seed):
            self.init_parameters(base, start, from_values=config.init != "random" or init_artifact is not None)

    def init_parameters(self, base: FrozenBase, start: Artifact, from_values: bool) -> None:  # pragma: no cover
        """Create the trainable tensors so that ``forward()`` starts at (or, for a reparameterized random start,
        from) ``start`` (float32, CPU). ``from_values``: ``start`` holds real values (a text's embeddings or KV, a
        saved artifact) rather than random ones."""
        raise NotImplementedError

    def forward(self) -> Artifact:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def materialize(self) -> Artifact:
        """The artifact to save and serve: detached, in the base model's dtype, encoders dropped."""
        return self().detached(self.base_dtype)

    def parameter_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups at base learning rate ``lr``: by default one group of every parameter at
        ``lr``. A method that trains parts at different rates (DePT: the soft prompt and the low-rank offsets)
        returns one group per part, each ``{"params": [...], "lr": ...}``; a schedule scales every group alike."""
        return [{"params": list(self.parameters()), "lr": lr}]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @classmethod
    def peft_options(cls, config: MethodConfig, hidden_size: int, init_text: str | None = None,
                     tokenizer_path: str | None = None) -> dict:
        """Keyword options of the PEFT counterpart's config (``peft_type``) for this method at ``config``:
        ``hidden_size`` is the model's, ``init_text`` the text our run starts from (``None``: not a text init),
        ``tokenizer_path`` a local tokenizer PEFT can load for a text init (``None``: none)."""
        return {}


__all__ = ["ALIASES", "REGISTRY", "PromptMethod"]
