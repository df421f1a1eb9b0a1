"""Adapters served from a directory: validation against the base model, an LRU memory limit, hot loading.

Every subdirectory of ``directory`` holding an ``adapter.json`` is an adapter named after the subdirectory; every
subdirectory holding a prompt table (``table.json``) serves each of its tasks as ``<subdirectory>.<task>``. Each
is validated on discovery (``load_adapter(dir, base)``: format, tensor shapes, base-model fingerprint) and its
artifact converted once to what is served (``prepare``: soft prompt -> exact KV prefix).

One cache, one byte budget (``max_bytes``, ``--max-adapter-memory-mb``): the loaded adapters and their placed
artifacts (``placed``: an adapter's served form after a lead, e.g. [system turn + soft prompt] KV, computed once per
(name, version, lead) and reused by every request with that lead) share one least-recently-used order, and whatever
was used longest ago is dropped first until the bytes fit. A dropped adapter reloads from disk on its next request,
a dropped placement is computed again; a new version or an unloaded adapter drops its placements at once.

Hot loading: ``scan()`` (run by ``start_polling`` every ``poll_s`` seconds, and by ``load(name)``) compares each
directory's signature (mtime and size of its two files) and reloads new or changed adapters (a changed table
reloads its tasks; tasks removed from it stop being served). Requests already in
flight hold a reference to the artifact they started with, so swapping or dropping an entry never affects them.
"""

from __future__ import annotations

import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from softprompts.adapter import AdapterError
from softprompts.adapter_io import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from softprompts.codec import read_table_record
from softprompts.errors import SoftpromptsError
from softprompts.model.artifacts import Artifact
from softprompts.model.placement import place
from softprompts.table import TABLE_CONFIG, TABLE_WEIGHTS, PromptTable
from softprompts.task_spec import TaskSpec

BASE_NAME = "base"  # the model without an adapter
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$"  # cannot be "." or "..", holds no path separator
_NAME = re.compile(NAME_PATTERN)


class InvalidAdapterName(SoftpromptsError):
    """A name with a path separator, ``..`` or other characters that cannot name a subdirectory."""


class UnknownAdapter(SoftpromptsError):
    """No adapter of that name in the directory (or it was unloaded)."""


def check_name(name: str) -> str:
    """Return ``name`` if it can only name a direct subdirectory; raise ``InvalidAdapterName`` otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: 1-128 letters, digits, '_', '-' and '.', starting with a letter, digit "
            "or '_' (so no path separators, no '..' and no hidden names)"
        )
    return name


@dataclass(frozen=True)
class ArtifactKey:
    """Which placed artifact a row runs with: adapter ``name`` at ``version`` after ``lead`` (the bare model:
    ``BASE_NAME``, version 0). An empty lead is the adapter's served artifact itself."""

    name: str
    version: int
    lead: tuple[int, ...]

    @classmethod
    def of(cls, entry: Entry | None, lead: tuple[int, ...]) -> ArtifactKey:
        return cls(BASE_NAME, 0, lead) if entry is None else cls(entry.name, entry.version, lead)


def nbytes(artifact: Artifact | None) -> int:
    """The bytes an artifact's tensors hold."""
    return sum(t.numel() * t.element_size() for t in artifact.tensors().values()) if artifact is not None else 0


@dataclass
class Entry:
    """One adapter directory as the server knows it. ``artifact`` is the served form (None while not in memory)."""

    name: str
    path: Path
    table_task: str | None = None  # the task's name inside a prompt table directory (None: an adapter directory)
    signature: tuple = ()
    artifact: Artifact | None = None
    source: Artifact | None = None  # the artifact as saved (a soft prompt before its KV): what placement extends
    method: str = ""
    task: TaskSpec | None = None  # the task the adapter records (None: none)
    num_virtual_tokens: int = 0
    nbytes: int = 0
    version: int = 0
    error: str | None = None
    loaded_at: float = 0.0

    @property
    def task_kind(self) -> str | None:
        """``classify`` / ``generate`` as the adapter records it (``None``: not recorded)."""
        return self.task.task if self.task is not None else None

    def describe(self) -> dict:
        return {
            "id": self.name,
            "object": "model",
            "method": self.method,
            "task": self.task_kind,
            "labels": self.task.labels if self.task is not None else None,
            "num_virtual_tokens": self.num_virtual_tokens,
            "loaded": self.artifact is not None,
            "bytes": self.nbytes,
            "version": self.version,
            "error": self.error,
        }


class Registry:
    """Thread-safe map name -> ``Entry`` over ``directory``; ``prepare`` turns a loaded artifact into its served
    form."""

    def __init__(
        self,
        base,
        directory: str | Path,
        prepare: Callable[[Artifact], Artifact] | None = None,
        max_bytes: int = 1 << 30,
        poll_s: float = 2.0,
    ):
        self.base = base
        self.directory = Path(directory)
        self.prepare = prepare or (lambda a: a)
        self.max_bytes = max_bytes
        self.poll_s = poll_s
        self._entries: dict[str, Entry] = {}
        self._lru: OrderedDict[str | ArtifactKey, int] = OrderedDict()  # loaded adapters and placements -> bytes
        self._placed: dict[ArtifactKey, Artifact | None] = {}
        self.placed_hits = self.placed_misses = 0
        self._disabled: set[str] = set()  # unloaded by DELETE: not hot-loaded back until load(name)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.directory.is_dir():
            raise SoftpromptsError(f"adapter directory {self.directory} does not exist")
        self.scan()

    # -- discovery ------------------------------------------------------------------------------------------
    def scan(self) -> list[str]:
        """Load new or changed adapter directories and table tasks, forget removed ones; returns the names
        (re)loaded."""
        changed = []
        present = set()
        for path in sorted(self.directory.iterdir()):
            for name, task in _served_names(path):
                if name in present:  # e.g. adapter directory "t.a" beside table "t" with task "a": first one wins
                    warnings.warn(f"{path}: adapter name {name!r} is already served from another directory; skipped",
                                  stacklevel=2)
                    continue
                present.add(name)
                if name in self._disabled:
                    continue
                entry = self._entries.get(name)
                if entry is None or entry.signature != _signature(path, task):
                    self._load(name, path, task)
                    changed.append(name)
        with self._lock:
            for name in list(self._entries):
                if name not in present:
                    self._drop(name)
        return changed

    def _read(self, path: Path, task: str | None):
        """The adapter in ``path`` (an adapter directory, or task ``task`` of the prompt table in ``path``)."""
        if task is None:
            return load_adapter(path, self.base)
        return PromptTable.load(path, self.base).adapter(task)

    def _load(self, name: str, path: Path, task: str | None = None) -> Entry:
        signature = _signature(path, task)
        try:
            adapter = self._read(path, task)
            served = self.prepare(adapter.artifact)
        except Exception as exc:  # a broken file becomes an entry with its error, never a dead server
            with self._lock:
                entry = self._entries.setdefault(name, Entry(name=name, path=path, table_task=task))
                entry.signature, entry.error = signature, str(exc)  # an older good version keeps serving
            return entry
        with self._lock:
            old = self._entries.get(name)
            entry = Entry(
                name=name,
                path=path,
                table_task=task,
                signature=signature,
                artifact=served,
                source=adapter.artifact,
                method=adapter.method,
                task=adapter.task,
                num_virtual_tokens=served.length,
                nbytes=nbytes(served),
                version=(old.version + (old.signature != signature)) if old and old.version else 1,
                loaded_at=time.time(),
            )
            self._entries[name] = entry
            self._forget_placed(name, keep_version=entry.version)
            self._lru[name] = entry.nbytes
            self._lru.move_to_end(name)
            self._evict(keep=name)
        return entry

    def _evict(self, keep: str | ArtifactKey) -> None:
        """Drop the least recently used adapters and placements until the bytes fit (``keep`` stays)."""
        while self.loaded_bytes() > self.max_bytes and len(self._lru) > 1:
            oldest = next(n for n in self._lru if n != keep)
            if isinstance(oldest, ArtifactKey):
                del self._placed[oldest]
            else:  # a copy without the tensors: a request that got the entry before keeps its artifact (docstring)
                self._entries[oldest] = replace(self._entries[oldest], artifact=None, source=None)
            del self._lru[oldest]

    def _forget_placed(self, name: str, keep_version: int | None = None) -> None:
        """Drop ``name``'s placements (but those of ``keep_version``)."""
        for key in [k for k in self._placed if k.name == name and k.version != keep_version]:
            del self._placed[key], self._lru[key]

    def _drop(self, name: str) -> None:
        self._entries.pop(name, None)
        self._lru.pop(name, None)
        self._forget_placed(name)

    # -- requests -------------------------------------------------------------------------------------------
    def get(self, name: str) -> Entry:
        """The entry with its artifact in memory (reloaded from disk if the LRU dropped it)."""
        check_name(name)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or name in self._disabled:
                raise UnknownAdapter(f"adapter {name!r} not found; GET /v1/adapters lists the loaded ones")
            if entry.artifact is not None:
                self._lru.move_to_end(name)
                return entry
        entry = self._load(name, entry.path, entry.table_task)  # dropped by the LRU: back from disk
        if entry.artifact is None:
            raise AdapterError(f"adapter {name!r} cannot be loaded: {entry.error}")
        return entry

    def placed(self, entry: Entry | None, lead: tuple[int, ...] = ()) -> Artifact | None:
        """What a row with ``lead`` runs with: ``entry``'s served artifact (``None``: the bare model) placed after
        the lead (``placement.place``, then ``prepare``), computed once per ``ArtifactKey`` and kept in the
        budget; with no lead the adapter's served artifact itself."""
        if not lead:
            return entry.artifact if entry is not None else None
        key = ArtifactKey.of(entry, tuple(lead))
        with self._lock:
            if key in self._placed:
                self._lru.move_to_end(key)
                self.placed_hits += 1
                return self._placed[key]
        served = self.prepare(place(self.base, entry.source if entry is not None else None, lead))
        with self._lock:
            self.placed_misses += 1
            current = self._entries.get(key.name)
            if entry is None or (current is not None and current.version == key.version):  # not a stale version
                self._placed[key] = served
                self._lru[key] = nbytes(served)
                self._lru.move_to_end(key)
                self._evict(keep=key)
        return served

    def load(self, name: str) -> Entry:
        """(Re)load ``name`` from its subdirectory (or table task) now (also re-enables an unloaded adapter)."""
        check_name(name)
        found = next(((p, t) for p in self._candidate_dirs(name) for n, t in _served_names(p) if n == name), None)
        if found is None:
            raise UnknownAdapter(f"no adapter directory {name!r} (with {CONFIG_FILE}) and no prompt-table task of "
                                 f"that name (DIR.TASK) under {self.directory}")
        with self._lock:
            self._disabled.discard(name)
        entry = self._load(name, *found)
        if entry.error is not None:  # also when an older good version keeps serving: this load failed
            raise AdapterError(f"adapter {name!r} cannot be loaded: {entry.error}")
        return entry

    def _candidate_dirs(self, name: str) -> list[Path]:
        """The subdirectory ``name`` itself, or for ``DIR.TASK`` the table directory ``DIR``."""
        return [self.directory / name] + ([self.directory / name.rsplit(".", 1)[0]] if "." in name else [])

    def unload(self, name: str) -> None:
        """Stop serving ``name`` (requests in flight finish); it stays off until ``load(name)``."""
        check_name(name)
        with self._lock:
            if name not in self._entries or name in self._disabled:
                raise UnknownAdapter(f"adapter {name!r} not found")
            self._disabled.add(name)
            self._drop(name)

    def entries(self) -> list[Entry]:
        with self._lock:
            return [e for n, e in sorted(self._entries.items()) if n not in self._disabled]

    def loaded_bytes(self) -> int:
        """The bytes of the loaded adapters and their placements: at most ``max_bytes`` (but for the one last
        used)."""
        with self._lock:
            return sum(self._lru.values())

    # -- hot loading ----------------------------------------------------------------------------------------
    def start_polling(self) -> None:
        if self._thread is None and self.poll_s > 0:
            self._stop.clear()  # started again after stop()
            self._thread = threading.Thread(target=self._poll, name="adapter-poller", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.scan()
            except Exception as exc:  # keep hot loading alive (directory briefly unavailable, ...)
                warnings.warn(f"adapter scan of {self.directory} failed: {exc}; retrying", stacklevel=2)


def _served_names(path: Path) -> list[tuple[str, str | None]]:
    """``[(name, table task)]`` served from one subdirectory: ``[(dir, None)]`` for an adapter directory,
    ``[(dir.task, task), ...]`` for a prompt table (``[(dir, "")]`` when its table.json cannot be read: loading task
    "" fails with the table's own error, which the entry then shows), ``[]`` otherwise or for a name that is not
    allowed (invalid characters, or ``dir.task`` longer than an adapter name may be)."""
    try:
        check_name(path.name)
    except InvalidAdapterName:
        return []
    if (path / CONFIG_FILE).is_file():
        return [(path.name, None)]
    if not (path / TABLE_CONFIG).is_file():
        return []
    try:
        tasks = read_table_record(path).tasks
    except (OSError, SoftpromptsError):
        return [(path.name, "")]
    return [(f"{path.name}.{task}", task) for task in sorted(tasks) if _NAME.match(f"{path.name}.{task}")]


def _signature(path: Path, task: str | None = None) -> tuple:
    parts = []
    for name in (CONFIG_FILE, WEIGHTS_FILE) if task is None else (TABLE_CONFIG, TABLE_WEIGHTS):
        try:
            st = (path / name).stat()
            parts.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            parts.append(None)
    return tuple(parts)
