"""The one I/O module (ground floor, importable by ``model/``): files written whole or not at all, read consistently.

Every write that a reader or a crash could catch half-done goes through here:

* ``atomic_file(path, write)``: ``write(tmp)`` fills a temporary sibling ``.NAME.tmp-PID-*`` of ``path``, then
  ``os.replace(tmp, path)`` (atomic within one filesystem): ``path`` holds the old content or the new, never a part.
  ``atomic_text`` and ``atomic_json`` are the common cases.
* ``atomic_directory(target, write, overwrite)``: the same for a directory (an adapter, a prompt table, a prepared
  dataset, the converted embedded model): ``write(tmp_dir)`` fills a temporary sibling directory that then takes
  ``target``'s place. Replacing an existing ``target`` swaps the two directories in ONE atomic step where the system
  can (Linux ``renameat2(RENAME_EXCHANGE)``), so a reader polling ``target`` always finds the old version or the new
  one, never nothing; elsewhere the old one is renamed away first (a reader can miss ``target`` for an instant). A
  failing ``write`` (or Ctrl-C) removes the temporary and leaves ``target`` as it was.
* Temporaries carry the writer's PID. A process killed mid-write leaves its temporary behind; the next write of the
  same target removes the ones whose process is gone (``remove_stale``).

Reading: ``read_files(directory, names)`` reads several files of a directory from ONE version of it (the directory is
opened once and every file read through that handle, retrying if it was replaced mid-read), so a concurrent
``atomic_directory`` never yields the old ``adapter.json`` with the new weights. ``read_json(path, error)`` parses a
JSON file or raises ``error`` naming the file, the problem and the line; ``read_json_or_none`` is for files that may
legitimately be absent or stale (resumable runs).
``file_sha256(path)`` hashes a file's bytes (pinned archives, a KV prefix's cache salt).

Where: ``cache_dir()`` is ``$SOFTPROMPTS_CACHE`` or ``~/.cache/softprompts`` (the converted embedded model, downloaded
archives, prepared datasets).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from softprompts.errors import SoftpromptsError

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def cache_dir() -> Path:
    """Where softprompts keeps what it builds once: ``$SOFTPROMPTS_CACHE``, else ``~/.cache/softprompts``."""
    return Path(os.environ.get("SOFTPROMPTS_CACHE") or Path.home() / ".cache" / "softprompts").expanduser()


# --- temporaries ----------------------------------------------------------------------------------------------------


def _prefix(path: Path, kind: str = "tmp") -> str:
    return f".{path.name}.{kind}-{os.getpid()}-"


def _owner_gone(name: str, target: str) -> bool:
    """Whether a temporary ``.TARGET.{tmp,old}-PID-...`` belongs to a process that no longer runs."""
    rest = name[len(target) + 2 :]  # after ".TARGET."
    kind, _, rest = rest.partition("-")
    pid = rest.partition("-")[0]
    if kind not in ("tmp", "old") or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):  # alive under another user, or not ours to judge
        return False
    return False


def remove_stale(target: str | Path) -> list[Path]:
    """Remove the temporaries of ``target`` left by writers that were killed; returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for sibling in target.parent.glob(f".{target.name}.*-*"):
        if _owner_gone(sibling.name, target.name):
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)
            removed.append(sibling)
    return removed


def _temporary_sibling(path: Path) -> Path:
    """A fresh, unused name next to ``path`` (same directory, hence same filesystem: the rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=_prefix(path), dir=path.parent)
    os.close(fd)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- writing --------------------------------------------------------------------------------------------------------


def atomic_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` (it creates or fills the file ``tmp``), then rename ``tmp`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (non-JSON values via ``str``) to ``path`` atomically."""
    return atomic_text(path, json.dumps(data, indent=2, default=str) + "\n")


@functools.cache
def _renameat2() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or another libc
        return None


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the system
    or the filesystem cannot (then nothing changed)."""
    renameat2 = _renameat2()
    return renameat2 is not None and renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                                               _RENAME_EXCHANGE) == 0


def check_output(target: str | Path, overwrite: bool = False) -> Path:
    """Fail early (``SoftpromptsError``) when ``target`` cannot become an output directory: it exists and
    ``overwrite`` is off, it is a file, or a path component above it is a file. Nothing is created."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise SoftpromptsError(f"{target} already exists; choose another directory or pass --overwrite")
    if target.is_file():
        raise SoftpromptsError(f"{target} is a file, not a directory; choose another output path")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SoftpromptsError(f"cannot create {target}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise SoftpromptsError(f"cannot create {target}: {parent} is not writable")
            break
    return target


def atomic_directory(target: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_dir)`` then put ``tmp_dir`` in ``target``'s place. An existing ``target`` needs ``overwrite``.

    Raises ``FileExistsError`` for an existing ``target`` without ``overwrite`` (also when another process put its
    copy there while ``write`` ran).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another directory or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=target.parent))
    try:
        write(tmp)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists; choose another directory or pass --overwrite")
        if not target.exists():
            os.replace(tmp, target)
        elif exchange(tmp, target):  # target: the new version; tmp: the old one
            _remove(tmp)
        else:
            trash = Path(tempfile.mkdtemp(prefix=_prefix(target, "old"), dir=target.parent))
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        if tmp.exists():
            _remove(tmp)
        raise
    return target


# --- reading --------------------------------------------------------------------------------------------------------


def read_files(directory: str | Path, names: Iterable[str], attempts: int = 50) -> dict[str, bytes]:
    """``{name: content}`` of files in ``directory``, all from one version of it (see the module docstring).

    A name that does not exist raises ``FileNotFoundError`` for that file; a directory replaced while it was being
    read is read again (up to ``attempts`` times).
    """
    directory, names = Path(directory), list(names)
    if not (hasattr(os, "O_DIRECTORY") and os.open in os.supports_dir_fd):  # e.g. Windows: by path
        return {name: (directory / name).read_bytes() for name in names}
    for _ in range(attempts):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            out, replaced = {}, False
            for name in names:
                try:
                    file = os.open(name, os.O_RDONLY, dir_fd=fd)
                except FileNotFoundError:
                    if _same_directory(fd, directory):
                        raise FileNotFoundError(f"{directory / name} does not exist") from None
                    replaced = True  # this version is being removed: read the new one
                    break
                with os.fdopen(file, "rb") as f:
                    out[name] = f.read()
            if not replaced and _same_directory(fd, directory):
                return out
        finally:
            os.close(fd)
    raise OSError(f"{directory} kept changing while it was read ({attempts} attempts); try again")


def _same_directory(fd: int, directory: Path) -> bool:
    """Whether the open directory ``fd`` is still the one at ``directory``."""
    try:
        now = os.stat(directory)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_ino, held.st_dev) == (now.st_ino, now.st_dev)


def read_json(path: str | Path, error: type[Exception] = SoftpromptsError) -> Any:
    """The parsed content of a JSON file; ``error`` (a message naming the file) if it is missing, unreadable or
    not valid JSON."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc})") from None
    return parse_json(data, path, error)


def parse_json(data: bytes, path: str | Path, error: type[Exception] = SoftpromptsError) -> Any:
    """``data`` (the content of ``path``) parsed as UTF-8 JSON, or ``error`` naming the file and the line."""
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_json_or_none(path: str | Path) -> Any | None:
    """The parsed content of a JSON file, or ``None`` when it is absent, unreadable or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


__all__ = ["atomic_directory", "atomic_file", "atomic_json", "atomic_text", "cache_dir", "check_output", "exchange",
           "file_sha256", "parse_json", "read_files", "read_json", "read_json_or_none", "remove_stale"]
