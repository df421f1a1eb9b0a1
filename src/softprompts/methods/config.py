"""The options every method has: a frozen dataclass, validated with every problem listed at once.

A method's own config subclasses ``MethodConfig``; its field defaults are the method's measured defaults
(docs/DEFAULTS.md), so ``create_method(base, name)`` and the command line start from the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from softprompts.errors import SoftpromptsError

INITS = ("random", "vocab", "text", "labels")


class MethodError(SoftpromptsError):
    """An unknown method name or an invalid method option."""


@dataclass(frozen=True)
class MethodConfig:
    """Options every method has.

    num_virtual_tokens: P, the number of virtual positions (Lester et al.: gains are marginal beyond ~20).
    init: how the virtual tokens start: ``random``, ``vocab`` (sampled vocabulary embeddings), ``text`` (the
        embeddings, or for prefixes the KV, of ``init_text``: cut to its first P tokens, or left-filled with the
        end-of-text token when shorter) or ``labels`` (class-label words first, Lester's best, then sampled
        vocabulary).
    init_text: the text for ``init="text"`` (default: the task instruction ``build_method`` derives).
    seed: seeds the random parts of initialization (sampled vocabulary, random values, encoder weights).
    """

    num_virtual_tokens: int = 20
    init: str = "text"
    init_text: str | None = None
    seed: int = 0

    allowed_inits: ClassVar[tuple[str, ...]] = INITS
    # the method's own knobs `softprompts tune` searches (field -> the values it tries); see ``search_choices``
    tunable: ClassVar[dict[str, tuple]] = {}

    @classmethod
    def search_choices(cls) -> dict[str, tuple]:
        """Field -> the values ``softprompts tune`` tries for this method (``training/tune.py``; the learning rate is
        searched beside them): ``num_virtual_tokens`` around the default ``P`` (``P/2, P, 2P``), then the method's
        own ``tunable`` knobs, which may also replace that set."""
        p = cls.num_virtual_tokens
        return {"num_virtual_tokens": tuple(sorted({max(1, p // 2), p, 2 * p})), **cls.tunable}

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
        """Build and validate; ``MethodError`` lists unknown options or every invalid value."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise MethodError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; "
                              f"known: {', '.join(sorted(known))}")
        config = cls(**options)
        problems = config.errors()
        if problems:
            raise MethodError(f"invalid {cls.__name__}: " + "; ".join(problems))
        return config


__all__ = ["INITS", "MethodConfig", "MethodError"]
