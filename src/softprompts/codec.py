"""The one reader and writer of the metadata documents: ``adapter.json`` and a prompt table's ``table.json``.

A document is validated whole (``schema.py``: every problem listed) and turned into typed records ONCE, here; the
rest of the package reads the records, never the JSON::

    adapter.json  -> AdapterRecord(method, method_config, artifact, num_virtual_tokens, num_parameters, dtype,
                                   task: TaskSpec | None, base: BaseRecord)
    table.json    -> TableRecord(base: BaseRecord | None, tasks: {name: TableEntry(... the same ..., tensors)})

Writing is the inverse (``adapter_text``, ``table_text``), key for key in the order the files have always had, so
a document this release writes reads back to the same record and writes back to the same bytes. ``task`` on disk is
``{}`` for no task; a record given partially (``{"task": "generate"}``) is written whole (``TaskSpec.to_json``).
Fields a later minor release may add are accepted on reading and not kept.

``tests/test_architecture.py`` checks that no other module reads these two files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from softprompts.errors import SoftpromptsError
from softprompts.files import parse_json, read_json
from softprompts.model.frozen import WEIGHTS_FORM, FrozenBase
from softprompts.model.probe import ModelShapes
from softprompts.schema import (
    ADAPTER_FORMAT,
    ADAPTER_VERSION,
    TABLE_FORMAT,
    TABLE_VERSION,
    AdapterDoc,
    TableDoc,
    validated,
)
from softprompts.task_spec import TaskSpec

R = TypeVar("R")
ADAPTER_FILE = "adapter.json"
TABLE_FILE = "table.json"


class AdapterError(SoftpromptsError):
    """An adapter file set that cannot be used (malformed, corrupted, wrong version)."""


class TableError(AdapterError):
    """A prompt table that cannot be read or an operation on it that is refused."""


@dataclass(frozen=True)
class BaseRecord:
    """A base model as adapters and tables record it: its name, probed shapes and weights fingerprint."""

    name: str
    shapes: ModelShapes
    weights_fingerprint: str = ""  # "" = unknown (files from before it was recorded)
    # a loaded base's fingerprint in the form files written before "w2:" hold (never saved)
    legacy_weights_fingerprint: str = field(default="", compare=False, repr=False)

    @classmethod
    def of(cls, base: FrozenBase) -> BaseRecord:
        return cls(base.name, base.shapes, base.weights_fingerprint(), base.legacy_weights_fingerprint())

    def weights_in_form_of(self, recorded: str) -> str:
        """This base's fingerprint in the form ``recorded`` was written in ("" = not comparable: an older file
        against another file, where no loaded base can say)."""
        if not recorded or recorded.startswith(WEIGHTS_FORM) == self.weights_fingerprint.startswith(WEIGHTS_FORM):
            return self.weights_fingerprint
        return self.legacy_weights_fingerprint if not recorded.startswith(WEIGHTS_FORM) else ""

    @property
    def quantization(self) -> str | None:
        """``nf4``, ``int8``, ... for a quantized base (the fingerprint's suffix), ``None`` in full precision."""
        return self.weights_fingerprint.partition("-")[2] or None

    def to_json(self) -> dict:
        return {"name": self.name, "quantization": self.quantization, "fingerprint": self.shapes.fingerprint(),
                "weights_fingerprint": self.weights_fingerprint, "shapes": self.shapes.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> BaseRecord:
        return cls(data["name"], ModelShapes.from_json(data["shapes"]), data.get("weights_fingerprint") or "")


@dataclass(frozen=True)
class ArtifactRecord:
    """What a saved artifact is (``adapter.json`` and each task of ``table.json``): the method that made it and its
    configuration, the artifact kind (``soft_prompt`` / ``kv_prefix``), its length ``P``, parameter count and dtype,
    and the task it was made for (``None``: none recorded)."""

    method: str
    method_config: dict
    artifact: str
    num_virtual_tokens: int
    num_parameters: int
    dtype: str
    task: TaskSpec | None

    def _head(self) -> dict[str, Any]:
        return {"method": self.method, "method_config": self.method_config, "artifact": self.artifact,
                "num_virtual_tokens": self.num_virtual_tokens, "num_parameters": self.num_parameters,
                "dtype": self.dtype}


@dataclass(frozen=True)
class AdapterRecord(ArtifactRecord):
    """``adapter.json``: an artifact record and the base model it was made for."""

    base: BaseRecord


@dataclass(frozen=True)
class TableEntry(ArtifactRecord):
    """One task of ``table.json``: an artifact record and the names of its tensors in ``table.safetensors``."""

    tensors: tuple[str, ...]


@dataclass(frozen=True)
class TableRecord:
    """``table.json``: the base model (``None`` until a first task) and the tasks by name."""

    base: BaseRecord | None = None
    tasks: dict[str, TableEntry] = field(default_factory=dict)


def task_json(task: TaskSpec | None) -> dict:
    """A record's ``task`` as saved: ``{}`` for none."""
    return {} if task is None else task.to_json()


def _task(data: dict) -> TaskSpec | None:
    return TaskSpec.from_record(data) if data else None


def _artifact_fields(doc: dict) -> dict[str, Any]:
    return {"method": doc["method"], "method_config": dict(doc.get("method_config") or {}),
            "artifact": doc["artifact"], "num_virtual_tokens": doc["num_virtual_tokens"],
            "num_parameters": doc["num_parameters"], "dtype": doc["dtype"], "task": _task(doc.get("task") or {})}


# ---- adapter.json --------------------------------------------------------------------------------------------------
def adapter_json(record: AdapterRecord) -> dict:
    return {"format": ADAPTER_FORMAT, "format_version": ADAPTER_VERSION, **record._head(),
            "base_model": record.base.to_json(), "task": task_json(record.task)}


def adapter_text(record: AdapterRecord) -> str:
    """``adapter.json``'s bytes (as text) for ``record``."""
    return json.dumps(adapter_json(record), indent=2) + "\n"


def decode_adapter(data: Any, where: str | Path) -> AdapterRecord:
    """A parsed ``adapter.json`` (from the file ``where``) as its record; ``AdapterError`` listing every problem."""
    validated(AdapterDoc, data, str(where), AdapterError)
    return AdapterRecord(**_artifact_fields(data), base=BaseRecord.from_json(data["base_model"]))


def parse_adapter(raw: bytes, where: str | Path) -> AdapterRecord:
    """``decode_adapter`` of the file content ``raw``."""
    return decode_adapter(parse_json(raw, where, AdapterError), where)


def _read(directory: str | Path, name: str, what: str, error: type[Exception], decode: Callable[[Any, Path], R]) -> R:
    path = Path(directory) / name
    if not path.is_file():
        raise error(f"{directory} is not {what}: {name} is missing")
    return decode(read_json(path, error), path)


def read_adapter_record(directory: str | Path) -> AdapterRecord:
    """The record of the adapter directory ``directory`` (its ``adapter.json`` only: no tensors read)."""
    return _read(directory, ADAPTER_FILE, "an adapter directory", AdapterError, decode_adapter)


# ---- table.json ----------------------------------------------------------------------------------------------------
def _entry_json(entry: TableEntry) -> dict:
    return {**entry._head(), "tensors": list(entry.tensors), "task": task_json(entry.task)}


def table_json(record: TableRecord) -> dict:
    return {"format": TABLE_FORMAT, "format_version": TABLE_VERSION,
            "base_model": None if record.base is None else record.base.to_json(),
            "tasks": {name: _entry_json(record.tasks[name]) for name in sorted(record.tasks)}}


def table_text(record: TableRecord) -> str:
    """``table.json``'s bytes (as text) for ``record``."""
    return json.dumps(table_json(record), indent=2) + "\n"


def decode_table(data: Any, where: str | Path) -> TableRecord:
    """A parsed ``table.json`` as its record; ``TableError`` listing every problem (the checks of
    ``decode_adapter`` for every task: known method, its configuration, artifact kind, task, base shapes)."""
    validated(TableDoc, data, str(where), TableError)
    base = data.get("base_model")
    tasks = {name: TableEntry(**_artifact_fields(doc), tensors=tuple(doc["tensors"]))
             for name, doc in (data.get("tasks") or {}).items()}
    return TableRecord(None if base is None else BaseRecord.from_json(base), tasks)


def parse_table(raw: bytes, where: str | Path) -> TableRecord:
    """``decode_table`` of the file content ``raw``."""
    return decode_table(parse_json(raw, where, TableError), where)


def read_table_record(directory: str | Path) -> TableRecord:
    """The record of the prompt table in ``directory`` (its ``table.json`` only)."""
    return _read(directory, TABLE_FILE, "a prompt table", TableError, decode_table)


__all__ = ["ADAPTER_FILE", "TABLE_FILE", "AdapterError", "AdapterRecord", "ArtifactRecord", "BaseRecord",
           "TableEntry", "TableError", "TableRecord", "adapter_json", "adapter_text", "decode_adapter",
           "decode_table", "parse_adapter", "parse_table", "read_adapter_record", "read_table_record", "task_json"]
