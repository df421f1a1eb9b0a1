"""An adapter: one materialized artifact plus what it was made for (method, base model, task).

One rule decides whether an adapter (or a prompt table) fits a base model, wherever it is loaded
(``check_base_fits``): other SHAPES (layers, hidden size, key/value heads, head dims, vocabulary) are refused, naming
both models; the same shapes with other WEIGHTS (another checkpoint of the architecture, e.g. a base model and its
instruct version) load with a ``BaseWeightsWarning`` naming both: transferring a soft prompt between checkpoints is a
thing users do on purpose.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from softprompts.codec import AdapterError, AdapterRecord, BaseRecord, adapter_json
from softprompts.model.artifacts import Artifact
from softprompts.model.frozen import FrozenBase
from softprompts.model.probe import ModelShapes
from softprompts.task_spec import TaskSpec


def task_record(task: TaskSpec | dict | None) -> TaskSpec | None:
    """A task as the adapter holds it: a ``TaskSpec``, or ``None`` for none; a dict (``TaskSpec.to_json``'s form,
    possibly partial, e.g. ``{"task": "generate"}``) is converted once, here."""
    if task is None or isinstance(task, TaskSpec):
        return task
    return TaskSpec.from_record(task) if task else None


@dataclass
class Adapter:
    """What is saved and served: an artifact, the method that made it, the base model it was made for and the task
    it was made for (``task``: a ``TaskSpec``, ``None`` when none was recorded)."""

    artifact: Artifact
    method: str
    method_config: dict
    base_name: str
    base_shapes: ModelShapes
    base_weights_fingerprint: str = ""
    task: TaskSpec | None = None

    def __post_init__(self) -> None:
        self.task = task_record(self.task)

    @classmethod
    def from_method(cls, method, base: FrozenBase, task: TaskSpec | dict | None = None) -> Adapter:
        return cls(
            artifact=method.materialize(),
            method=method.name,
            method_config=method.config.to_json(),
            base_name=base.name,
            base_shapes=base.shapes,
            base_weights_fingerprint=base.weights_fingerprint(),
            task=task_record(task),
        )

    @classmethod
    def from_record(cls, record: AdapterRecord, artifact: Artifact) -> Adapter:
        """The adapter of a document's ``record`` (``codec.py``) holding ``artifact``."""
        return cls(artifact=artifact, method=record.method, method_config=dict(record.method_config),
                   base_name=record.base.name, base_shapes=record.base.shapes,
                   base_weights_fingerprint=record.base.weights_fingerprint, task=record.task)

    @property
    def num_virtual_tokens(self) -> int:
        return self.artifact.length

    @property
    def num_parameters(self) -> int:
        return self.artifact.num_parameters()

    def record(self) -> AdapterRecord:
        """What ``adapter.json`` records of this adapter (``codec.py`` writes it)."""
        return AdapterRecord(
            method=self.method, method_config=self.method_config, artifact=self.artifact.kind,
            num_virtual_tokens=self.num_virtual_tokens, num_parameters=self.num_parameters,
            dtype=str(next(iter(self.artifact.tensors().values())).dtype).removeprefix("torch."),
            task=self.task, base=self.base_record,
        )

    def metadata(self) -> dict:
        """``adapter.json`` as a dict (``codec.adapter_json``)."""
        return adapter_json(self.record())

    @property
    def base_record(self) -> BaseRecord:
        return BaseRecord(self.base_name, self.base_shapes, self.base_weights_fingerprint)

    def check_base(self, base: FrozenBase) -> None:
        """``check_base_fits``: refused for a base model of other shapes, a warning for other weights."""
        check_base_fits("adapter", self.base_record, BaseRecord.of(base))


class AdapterMismatchError(AdapterError):
    """An adapter made for another base model."""


class BaseWeightsWarning(UserWarning):
    """An adapter made on another checkpoint with the same shapes (it loads; outputs may differ from training)."""


def check_base_fits(what: str, made_for: BaseRecord, used_with: BaseRecord,
                    where: str = "the loaded base model") -> None:
    """The one rule (module docstring): ``AdapterMismatchError`` when the shapes differ, ``BaseWeightsWarning`` when
    only the weights do (both fingerprints known). ``what`` / ``where`` name the two sides in the message."""
    if made_for.shapes.fingerprint() != used_with.shapes.fingerprint():
        raise AdapterMismatchError(
            f"{what} was made for base model {made_for.name!r} ({describe(made_for.shapes)}) but {where} is "
            f"{used_with.name!r} ({describe(used_with.shapes)}); load it with --model {made_for.name}"
        )
    a = made_for.weights_fingerprint
    b = used_with.weights_in_form_of(a)
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
