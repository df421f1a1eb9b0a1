"""The metadata documents on disk, as schemas: ``adapter.json`` and a prompt table's ``table.json``.

Every read validates the WHOLE document and reports every problem at once, each with where it is (``base_model ->
shapes -> kv_heads``) and what was found, so an edited or truncated file is one clear error, never a traceback
deeper in the code. The rules beyond types: a known ``format`` and a ``format_version`` this release reads (an int,
not a string), a method that exists (``methods.METHODS``) and whose artifact kind the document names, its
``method_config`` valid for that method, per-layer shapes that agree with ``num_layers``.

pydantic does the validation (the server's FastAPI already builds on it); ``validated(model, data, where, error)``
turns its errors into one message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from softprompts.methods import METHODS, method_class

ADAPTER_FORMAT = "softprompts-adapter"
ADAPTER_VERSION = 1
TABLE_FORMAT = "softprompts-table"
TABLE_VERSION = 1


class _Document(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)  # fields added by later minor releases are kept


class ShapesDoc(_Document):
    """``ModelShapes`` as saved: what an adapter must agree with to run on a model."""

    model_type: str
    num_layers: StrictInt = Field(ge=1)
    hidden_size: StrictInt = Field(ge=1)
    vocab_size: StrictInt = Field(ge=1)
    kv_heads: list[StrictInt] = Field(min_length=1)
    head_dims: list[StrictInt] = Field(min_length=1)
    dtype: str

    @model_validator(mode="after")
    def _per_layer(self) -> ShapesDoc:
        if not len(self.kv_heads) == len(self.head_dims) == self.num_layers:
            raise ValueError(f"kv_heads ({len(self.kv_heads)}) and head_dims ({len(self.head_dims)}) must have one "
                             f"entry per layer (num_layers {self.num_layers})")
        if min(self.kv_heads + self.head_dims) < 1:
            raise ValueError("kv_heads and head_dims must be positive")
        return self


class BaseModelDoc(_Document):
    """The base model an adapter or a table was made for."""

    name: str = Field(min_length=1)
    fingerprint: str = Field(min_length=1)
    weights_fingerprint: str = ""  # ends with -QUANTIZATION for a quantized base
    quantization: str | None = None  # nf4, int8, ... (model/quantize.py); None: full precision or not recorded
    shapes: ShapesDoc


class ChatDoc(_Document):
    """How a chat task's prompts are built: where the soft prompt goes, and a system message for rows without one."""

    placement: Literal["start", "after-system", "user-start"] = "start"
    system: str | None = None


class TaskDoc(_Document):
    """``TaskSpec`` as saved (every field optional: an adapter may carry only part of it, or none)."""

    task: Literal["classify", "generate"] | None = None
    prompt: str | None = None
    target: str | None = None
    labels: list[str] | None = None
    max_prompt_tokens: StrictInt | None = Field(None, ge=1)
    max_target_tokens: StrictInt | None = Field(None, ge=1)
    chat: ChatDoc | None = None


class ArtifactDoc(_Document):
    """What a saved artifact is: the method that made it, its kind and size."""

    method: str
    method_config: dict[str, Any] = Field(default_factory=dict)
    artifact: Literal["soft_prompt", "kv_prefix", "offset_prompt"]
    num_virtual_tokens: StrictInt = Field(ge=1)
    num_parameters: StrictInt = Field(ge=1)
    dtype: str
    task: TaskDoc = Field(default_factory=TaskDoc)

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; this softprompts has {', '.join(METHODS)}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> ArtifactDoc:
        if self.method not in METHODS:
            return self  # already reported
        cls = method_class(self.method)
        if cls.artifact_kind != self.artifact:
            raise ValueError(f"method {self.method!r} makes a {cls.artifact_kind}, the document says {self.artifact}")
        problems = cls.config_class(**_known_fields(cls.config_class, self.method_config)).errors()
        unknown = sorted(set(self.method_config) - set(cls.config_class.__dataclass_fields__))
        if unknown:
            problems.append(f"unknown option(s) {', '.join(unknown)}")
        if problems:
            raise ValueError(f"method_config is not valid for {self.method!r}: " + "; ".join(problems))
        return self


def _known_fields(config_class, options: dict) -> dict:
    return {k: v for k, v in options.items() if k in config_class.__dataclass_fields__}


class AdapterDoc(ArtifactDoc):
    """``adapter.json``."""

    format: Literal["softprompts-adapter"]
    format_version: StrictInt = Field(ge=1, le=ADAPTER_VERSION)
    base_model: BaseModelDoc


class TableTaskDoc(ArtifactDoc):
    """One task of ``table.json``: an artifact plus the names of its tensors in ``table.safetensors``."""

    tensors: list[str] = Field(min_length=1)


class TableDoc(_Document):
    """``table.json``."""

    format: Literal["softprompts-table"]
    format_version: StrictInt = Field(ge=1, le=TABLE_VERSION)
    base_model: BaseModelDoc | None = None
    tasks: dict[str, TableTaskDoc] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _base_for_tasks(self) -> TableDoc:
        if self.tasks and self.base_model is None:
            raise ValueError("a table with tasks needs its base_model")
        return self


def validated(model: type[BaseModel], data: Any, where: str, error: type[Exception]) -> BaseModel:
    """``model.model_validate(data)``, or ``error`` listing every problem of ``data`` (the file ``where``, a
    ``model.__doc__`` document)."""
    if isinstance(data, dict) and isinstance(data.get("format_version"), int):
        newest = model.model_fields["format_version"].metadata
        limit = next((m.le for m in newest if getattr(m, "le", None) is not None), None)
        if limit is not None and data["format_version"] > limit:
            raise error(f"{where} has format version {data['format_version']}, newer than this softprompts reads "
                        f"({limit}); upgrade softprompts")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [f"{' -> '.join(str(p) for p in e['loc']) or 'the document'}: {_message(e)}" for e in exc.errors()]
        what = model.__doc__.split("``")[1]
        raise error(f"{where} is not a valid {what}: " + "; ".join(problems)) from None


def _message(error: dict) -> str:
    text = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("missing", "extra_forbidden"):
        return text.lower()
    found = error.get("input")
    shown = repr(found) if not isinstance(found, dict | list) else type(found).__name__
    return f"{text} (found {shown[:60]})"


__all__ = ["ADAPTER_FORMAT", "ADAPTER_VERSION", "TABLE_FORMAT", "TABLE_VERSION", "AdapterDoc", "TableDoc",
           "validated"]
