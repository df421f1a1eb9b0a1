"""A prompt table: many named tasks (soft prompts and KV prefixes, any lengths) for ONE base model, in one file set.

Layout of a table directory::

    table.json          {"format": "softprompts-table", "format_version": 1,
                         "base_model": {name, fingerprint, weights_fingerprint, shapes},
                         "tasks": {NAME: {method, method_config, artifact, num_virtual_tokens, num_parameters,
                                          dtype, tensors, task}}}
    table.safetensors   tensors namespaced ``tasks.<NAME>.<tensor>`` where ``<tensor>`` is the artifact's own
                        tensor name (``soft_prompt`` [P, hidden]; ``layers.<l>.key`` / ``layers.<l>.value``
                        [H_l, P, D_l])

Tensors are kept exactly as read (dtype, values, CPU) and written back untouched, so adding, replacing or removing a
task never changes another one bit for bit. Saving is atomic (a temporary sibling directory renamed into place);
concurrent writers are not merged: the last save wins.

Use: ``PromptTable.load(path, base)``, ``.names()``, ``.adapter(name)``, ``.add(name, adapter)``, ``.remove(name)``,
``.save()`` and ``.context(names_per_row)``: a ``VirtualContext`` mixing tasks row by row, so a batch whose rows
belong to different tasks runs in one forward. ``resolve_adapter("table:NAME" | "DIR#NAME" | "DIR", base, table)``
(and ``adapter_base_name(ref, table)``, the base to load when no ``--model`` is given) is the hook for ``eval``,
``generate`` and the serving engine: a drop-in for ``load_adapter(dir, base)``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from softprompts.adapter import Adapter, BaseRecord, check_base_fits
from softprompts.adapter_io import checked_artifact, load_adapter
from softprompts.codec import (
    TABLE_FILE,
    TableEntry,
    TableError,
    TableRecord,
    parse_table,
    read_adapter_record,
    table_json,
    table_text,
)
from softprompts.files import atomic_directory, read_files
from softprompts.model.artifacts import Artifact, VirtualContext, artifact_from_tensors, non_finite
from softprompts.model.frozen import FrozenBase
from softprompts.model.probe import ModelShapes
from softprompts.schema import TABLE_FORMAT

TABLE_CONFIG = TABLE_FILE
TABLE_WEIGHTS = "table.safetensors"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
TABLE_REF = "table:"


def check_name(name: str) -> str:
    """Task names: 1-64 characters, letters, digits, ``_`` and ``-``, starting with a letter or digit."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise TableError(
            f"invalid task name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


class PromptTable:
    """Named adapters sharing one base model. ``base_model``: the base recorded (``None`` until the first task is
    added); ``base`` (optional) sets the device/dtype ``adapter``/``context`` use."""

    def __init__(self, path: str | Path, base_model: BaseRecord | None = None, base: FrozenBase | None = None) -> None:
        self.path = Path(path)
        self.base_model = base_model
        self.base = base
        self._entries: dict[str, TableEntry] = {}  # name -> its record (codec.py)
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}  # name -> artifact tensors, exactly as stored
        self._cache: dict[str, Artifact] = {}  # name -> artifact on the base's device/dtype
        if base is not None and base_model is not None:
            self._check_base(base)

    # ---- reading -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, base: FrozenBase | None = None, create: bool = False) -> PromptTable:
        """Read a table directory; with ``base``, refuse a table made for another model. ``create``: a missing
        directory gives an empty table (written on ``save``). Every task gets the checks of an adapter directory
        (``adapter_io.checked_artifact``) besides its tensor names."""
        path = Path(path)
        config = path / TABLE_CONFIG
        if not config.is_file():
            if create and not path.exists():
                return cls(path, base=base)
            raise TableError(f"{path} is not a prompt table: {TABLE_CONFIG} is missing")
        try:  # both files from one version of the directory (a concurrent save swaps it whole)
            files = read_files(path, [TABLE_CONFIG, TABLE_WEIGHTS])
        except FileNotFoundError:
            files = read_files(path, [TABLE_CONFIG])  # no weights file: fine for a table without tasks
        record = parse_table(files[TABLE_CONFIG], config)
        tensors: dict[str, torch.Tensor] = {}
        if record.tasks:
            try:
                tensors = load(files[TABLE_WEIGHTS])
            except (KeyError, SafetensorError, ValueError) as exc:
                raise TableError(f"{path / TABLE_WEIGHTS} is missing, truncated or corrupted ({exc})") from None
        table = cls(path, base_model=record.base)
        for name, entry in record.tasks.items():
            prefix = f"tasks.{name}."
            own = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}
            if set(own) != set(entry.tensors):
                raise TableError(f"{path}: task {name!r} lists tensors {list(entry.tensors)} but holds {sorted(own)}")
            checked_artifact(entry, own, record.base.shapes, f"{path}: task {name!r}", TableError)
            table._entries[name] = entry
            table._tensors[name] = own
        if base is not None:
            table.attach(base)
        return table

    def attach(self, base: FrozenBase) -> PromptTable:
        """Use ``base`` for ``adapter``/``context`` (refused if the table was made for another model)."""
        if self.base_model is not None:
            self._check_base(base)
        self.base = base
        self._cache.clear()
        return self

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def info(self, name: str) -> TableEntry:
        """The record of task ``name`` (method, artifact kind, length, parameters, dtype, tensors, task)."""
        return self._entry(name)

    def artifact(self, name: str) -> Artifact:
        """Task ``name``'s artifact, on the attached base's device and dtype (cached), or as stored."""
        if name not in self._cache:
            entry = self._entry(name)
            artifact = artifact_from_tensors(entry.artifact, dict(self._tensors[name]))
            if self.base is not None:
                artifact = artifact.to(device=self.base.device, dtype=self.base.dtype)
            self._cache[name] = artifact
        return self._cache[name]

    def adapter(self, name: str) -> Adapter:
        """Task ``name`` as a standalone ``Adapter`` (what ``load_adapter`` returns for an adapter directory)."""
        entry, base = self._entry(name), self.base_record
        return Adapter(artifact=self.artifact(name), method=entry.method, method_config=dict(entry.method_config),
                       base_name=base.name, base_shapes=base.shapes, base_weights_fingerprint=base.weights_fingerprint,
                       task=entry.task)

    def context(self, names_per_row: list[str | None]) -> VirtualContext:
        """One task name (or ``None``: no adapter) per batch row -> a ``VirtualContext`` for one ``forward``.

        Rows may mix soft prompts and prefixes of different lengths: shorter ones are padded and masked, and each
        row gives exactly what its task gives alone.
        """
        return VirtualContext.from_rows([None if n is None else self.artifact(n) for n in names_per_row])

    @property
    def shapes(self) -> ModelShapes:
        return self.base_record.shapes

    # ---- writing -------------------------------------------------------------------------------------------
    def add(self, name: str, adapter: Adapter, replace: bool = False) -> None:
        """Add (or with ``replace``, overwrite) task ``name``; refuses an adapter made for another base model."""
        check_name(name)
        bad = non_finite(adapter.artifact.tensors())
        if bad:
            raise TableError(f"cannot add {name!r}: its artifact holds non-finite values (NaN or inf) in "
                             f"{', '.join(bad)}; retrain it with a lower --lr")
        if name in self._entries and not replace:
            raise TableError(f"task {name!r} already exists in {self.path}; pass --replace to overwrite it")
        if self.base_model is None:
            self.base_model = adapter.base_record
        else:
            self._check_adapter_base(name, adapter)
        tensors = {key: t.detach().cpu().clone().contiguous() for key, t in adapter.artifact.tensors().items()}
        record = adapter.record()
        self._entries[name] = TableEntry(
            method=record.method, method_config=dict(record.method_config), artifact=record.artifact,
            num_virtual_tokens=record.num_virtual_tokens, num_parameters=record.num_parameters, dtype=record.dtype,
            task=record.task, tensors=tuple(sorted(tensors)))
        self._tensors[name] = tensors
        self._cache.pop(name, None)

    def remove(self, name: str) -> None:
        self._entry(name)
        del self._entries[name], self._tensors[name]
        self._cache.pop(name, None)

    def record(self) -> TableRecord:
        """What ``table.json`` records (``codec.py`` writes it)."""
        return TableRecord(self.base_model, dict(self._entries))

    def metadata(self) -> dict:
        """``table.json`` as a dict (``codec.table_json``)."""
        return table_json(self.record())

    def save(self, path: str | Path | None = None) -> Path:
        """Atomically (re)write the table directory (``path`` defaults to where it was loaded from)."""
        target = Path(path) if path is not None else self.path
        tensors = {f"tasks.{n}.{key}": t for n in self.names() for key, t in self._tensors[n].items()}
        text = table_text(self.record())

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / TABLE_WEIGHTS), metadata={"format": TABLE_FORMAT})
            (tmp / TABLE_CONFIG).write_text(text)

        if target.exists() and not (target / TABLE_CONFIG).is_file():
            raise TableError(f"{target} exists and is not a prompt table; refusing to overwrite it")
        atomic_directory(target, write, overwrite=True)
        self.path = target
        return target

    # ---- checks --------------------------------------------------------------------------------------------
    def _entry(self, name: str) -> TableEntry:
        if name not in self._entries:
            known = ", ".join(self.names()) or "none"
            raise TableError(f"no task {name!r} in prompt table {self.path} (tasks: {known})")
        return self._entries[name]

    @property
    def base_record(self) -> BaseRecord:
        """The base model recorded; ``TableError`` for a table without one (no task added yet)."""
        if self.base_model is None:
            raise TableError(f"{self.path} is empty: it has no base model yet")
        return self.base_model

    def _check_base(self, base: FrozenBase) -> None:
        """The adapter rule (``adapter.check_base_fits``): other shapes refused, other weights warned."""
        check_base_fits(f"prompt table {self.path}", self.base_record, BaseRecord.of(base))

    def _check_adapter_base(self, name: str, adapter: Adapter) -> None:
        check_base_fits(f"task {name!r}", adapter.base_record, self.base_record,
                        where=f"the base model of prompt table {self.path}")


def _table_task(ref: str, table: PromptTable | str | Path | None) -> tuple[PromptTable, str] | None:
    """``(table, name)`` for ``table:NAME`` / ``TABLE_DIR#NAME`` references, ``None`` for an adapter directory."""
    if ref.startswith(TABLE_REF):
        if table is None:
            raise TableError(f"{ref!r} names a prompt-table task but no table was given (pass --table DIR)")
        return (table if isinstance(table, PromptTable) else PromptTable.load(table)), ref[len(TABLE_REF):]
    if "#" in ref and (Path(ref.rsplit("#", 1)[0]) / TABLE_CONFIG).is_file():
        path, name = ref.rsplit("#", 1)
        return PromptTable.load(path), name
    return None


def resolve_adapter(ref: str | Path, base: FrozenBase | None = None, table: PromptTable | str | Path | None = None):
    """Load an adapter from any reference: ``DIR`` (an adapter directory), ``TABLE_DIR#NAME`` (a task of a prompt
    table) or ``table:NAME`` (a task of ``table``, a ``PromptTable`` or its path). ``base`` as in ``load_adapter``.
    """
    found = _table_task(str(ref), table)
    if found is None:
        return load_adapter(ref, base)
    found_table, name = found
    if base is not None:
        found_table.attach(base)
    return found_table.adapter(name)


def adapter_base_name(ref: str | Path, table: PromptTable | str | Path | None = None) -> str:
    """The base model recorded for an adapter reference (as in ``resolve_adapter``), read without loading a model:
    what ``eval``/``generate`` pass to ``load_base`` when the user gives no ``--model``."""
    found = _table_task(str(ref), table)
    if found is None:
        return read_adapter_record(ref).base.name
    found_table, name = found
    found_table.info(name)  # raises a clear error for an unknown task
    return found_table.base_record.name
