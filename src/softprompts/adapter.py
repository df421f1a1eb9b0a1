"""An adapter: one materialized artifact plus what it was made for (method, base model, task)."""

from __future__ import annotations

from dataclasses import dataclass, field

from softprompts.errors import SoftpromptsError
from softprompts.model.artifacts import Artifact
from softprompts.model.base import BaseModel
from softprompts.model.probe import ModelShapes

FORMAT_NAME = "softprompts-adapter"
FORMAT_VERSION = 1


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
    def from_method(cls, method, base: BaseModel, task: dict | None = None) -> Adapter:
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
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "method_config": self.method_config,
            "artifact": self.artifact.kind,
            "num_virtual_tokens": self.num_virtual_tokens,
            "num_parameters": self.num_parameters,
            "dtype": str(next(iter(self.artifact.tensors().values())).dtype).removeprefix("torch."),
            "base_model": {
                "name": self.base_name,
                "fingerprint": self.base_shapes.fingerprint(),
                "weights_fingerprint": self.base_weights_fingerprint,
                "shapes": self.base_shapes.to_json(),
            },
            "task": self.task,
        }

    def check_base(self, base: BaseModel) -> None:
        """Raise ``AdapterMismatchError`` naming both models if this adapter was made for another base."""
        if self.base_shapes.fingerprint() != base.shapes.fingerprint():
            raise AdapterMismatchError(
                f"adapter was made for base model {self.base_name!r} ({describe(self.base_shapes)}) "
                f"but the loaded base model is {base.name!r} ({describe(base.shapes)}); "
                f"load it with --model {self.base_name}"
            )


class AdapterError(SoftpromptsError):
    """An adapter file set that cannot be used (malformed, corrupted, wrong version)."""


class AdapterMismatchError(AdapterError):
    """An adapter made for another base model."""


def describe(shapes: ModelShapes) -> str:
    heads = sorted(set(shapes.kv_heads))
    return (
        f"{shapes.model_type}, {shapes.num_layers} layers, hidden {shapes.hidden_size}, "
        f"vocab {shapes.vocab_size}, kv heads {heads[0] if len(heads) == 1 else heads}"
    )
