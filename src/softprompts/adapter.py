"""An adapter: one materialized artifact plus what it was made for (method, base model, task).

One rule decides whether an adapter (or a prompt table) fits a base model, wherever it is loaded
(``check_base_fits``): other SHAPES (layers, hidden size, key/value heads, head dims, vocabulary) are refused, naming
both models; the same shapes with other WEIGHTS (another checkpoint of the architecture, e.g. a base model and its
instruct version) load with a ``BaseWeightsWarning`` naming both: transferring a soft prompt between checkpoints is a
thing users do on purpose.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from softprompts.errors import SoftpromptsError
from softprompts.model.artifacts import Artifact
from softprompts.model.frozen import FrozenBase
from softprompts.model.probe import ModelShapes
from softprompts.schema import ADAPTER_FORMAT, ADAPTER_VERSION


@dataclass
class Adapter:
    """What is saved and served. ``task`` holds the task layer's metadata (template, target, labels, kind)."""

    artifact: Artifact
    method: str
    method_config: dict
    base_name: str
    base_shapes: ModelShapes
    base_weights_fingerprint: str = ""
    task: dict = field(default_factory=dict)

    @classmethod
    def from_method(cls, method, base: FrozenBase, task: dict | None = None) -> Adapter:
        return cls(
            artifact=method.materialize(),
            method=method.name,
            method_config=method.config.to_json(),
            base_name=base.name,
            base_shapes=base.shapes,
            base_weights_fingerprint=base.weights_fingerprint(),
            task=dict(task or {}),
        )

    @property
    def num_virtual_tokens(self) -> int:
        return self.artifact.length

    @property
    def num_parameters(self) -> int:
        return self.artifact.num_parameters()

    def metadata(self) -> dict:
        return {
            "format": ADAPTER_FORMAT,
            "format_version": ADAPTER_VERSION,
            "method": self.method,
            "method_config": self.method_config,
            "artifact": self.artifact.kind,
            "num_virtual_tokens": self.num_virtual_tokens,
            "num_parameters": self.num_parameters,
            "dtype": str(next(iter(self.artifact.tensors().values())).dtype).removeprefix("torch."),
            "base_model": {
                "name": self.base_name,
                "quantization": self.base_weights_fingerprint.partition("-")[2] or None,
                "fingerprint": self.base_shapes.fingerprint(),
                "weights_fingerprint": self.base_weights_fingerprint,
                "shapes": self.base_shapes.to_json(),
            },
            "task": self.task,
        }

    @property
    def base_record(self) -> BaseRecord:
        return BaseRecord(self.base_name, self.base_shapes, self.base_weights_fingerprint)

    def check_base(self, base: FrozenBase) -> None:
        """``check_base_fits``: refused for a base model of other shapes, a warning for other weights."""
        check_base_fits("adapter", self.base_record, BaseRecord.of(base))


class AdapterError(SoftpromptsError):
    """An adapter file set that cannot be used (malformed, corrupted, wrong version)."""


class AdapterMismatchError(AdapterError):
    """An adapter made for another base model."""


class BaseWeightsWarning(UserWarning):
    """An adapter made on another checkpoint with the same shapes (it loads; outputs may differ from training)."""


@dataclass(frozen=True)
class BaseRecord:
    """A base model as adapters and tables record it: its name, probed shapes and weights fingerprint."""

    name: str
    shapes: ModelShapes
    weights_fingerprint: str = ""  # "" = unknown (files from before it was recorded)

    @classmethod
    def of(cls, base: FrozenBase) -> BaseRecord:
        return cls(base.name, base.shapes, base.weights_fingerprint())


def check_base_fits(what: str, made_for: BaseRecord, used_with: BaseRecord,
                    where: str = "the loaded base model") -> None:
    """The one rule (module docstring): ``AdapterMismatchError`` when the shapes differ, ``BaseWeightsWarning`` when
    only the weights do (both fingerprints known). ``what`` / ``where`` name the two sides in the message."""
    if made_for.shapes.fingerprint() != used_with.shapes.fingerprint():
        raise AdapterMismatchError(
            f"{what} was made for base model {made_for.name!r} ({describe(made_for.shapes)}) but {where} is "
            f"{used_with.name!r} ({describe(used_with.shapes)}); load it with --model {made_for.name}"
        )
    a, b = made_for.weights_fingerprint, used_with.weights_fingerprint
    if a and b and a.split("-")[0] == b.split("-")[0] and a != b:
        warnings.warn(
            f"{what} was made on base model {made_for.name!r} {precision(a)} and {where} is {used_with.name!r} "
            f"{precision(b)}: the same checkpoint, other weights after rounding, so it loads but its outputs may "
            f"differ a little from training (benchmarks/quantized.py measures how much)", BaseWeightsWarning,
            stacklevel=3,
        )
    elif a and b and a != b:
        warnings.warn(
            f"{what} was made for base model {made_for.name!r} (weights {a}) and {where} is {used_with.name!r} "
            f"(weights {b}): same shapes, other weights, so it loads but its outputs may differ from training "
            f"(use --model {made_for.name} for the checkpoint it was trained on)", BaseWeightsWarning, stacklevel=3,
        )


def precision(weights_fingerprint: str) -> str:
    """How a recorded base's weights were stored: ``quantized nf4`` or ``in full precision``."""
    _, _, quantization = weights_fingerprint.partition("-")
    return f"quantized {quantization}" if quantization else "in full precision"


def describe(shapes: ModelShapes) -> str:
    heads = sorted(set(shapes.kv_heads))
    return (
        f"{shapes.model_type}, {shapes.num_layers} layers, hidden {shapes.hidden_size}, "
        f"vocab {shapes.vocab_size}, kv heads {heads[0] if len(heads) == 1 else heads}"
    )
