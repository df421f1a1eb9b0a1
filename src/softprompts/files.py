"""The one I/O module (ground floor, importable by ``model/``): files written whole or not at all, JSON read clearly.

Every write that a reader or a crash could catch half-done goes through here:

* ``atomic_file(path, write)``: ``write(tmp)`` fills a temporary sibling ``.NAME.tmp-*`` of ``path``, then
  ``os.replace(tmp, path)`` (atomic on POSIX and Windows within one filesystem): ``path`` holds the old content or the
  new, never a part. ``atomic_text`` and ``atomic_json`` are the common cases.
* ``atomic_directory(target, write, overwrite)``: the same for a directory (an adapter, a prompt table, a prepared
  dataset, the converted embedded model): ``write(tmp_dir)`` fills a temporary sibling directory that is renamed into
  place. A failing ``write`` (or Ctrl-C) removes the temporary and leaves ``target`` as it was.

Where: ``cache_dir()`` is ``$SOFTPROMPTS_CACHE`` or ``~/.cache/softprompts`` (the converted embedded model, downloaded
archives, prepared datasets).

Reading: ``read_json(path, error)`` parses a JSON file or raises ``error`` naming the file, the problem and the line;
``read_json_or_none(path)`` is for files that may legitimately be absent or stale (resumable runs).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from softprompts.errors import SoftpromptsError


def cache_dir() -> Path:
    """Where softprompts keeps what it builds once: ``$SOFTPROMPTS_CACHE``, else ``~/.cache/softprompts``."""
    return Path(os.environ.get("SOFTPROMPTS_CACHE") or Path.home() / ".cache" / "softprompts").expanduser()


def _temporary_sibling(path: Path) -> Path:
    """A fresh, unused name next to ``path`` (same directory, hence same filesystem: the rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` (it creates or fills the file ``tmp``), then rename ``tmp`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (non-JSON values via ``str``) to ``path`` atomically."""
    return atomic_text(path, json.dumps(data, indent=2, default=str) + "\n")


def atomic_directory(target: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``target``. An existing ``target`` needs ``overwrite``.

    Raises ``FileExistsError`` for an existing ``target`` without ``overwrite`` (also when another process renamed
    its own copy into place first).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another directory or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists() and not overwrite:  # another process put its copy there meanwhile
            raise FileExistsError(f"{target} already exists; choose another directory or pass --overwrite")
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_json(path: str | Path, error: type[Exception] = SoftpromptsError) -> Any:
    """The parsed content of a JSON file; ``error`` (a message naming the file) if it is missing, unreadable or
    not valid JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path} cannot be read ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_json_or_none(path: str | Path) -> Any | None:
    """The parsed content of a JSON file, or ``None`` when it is absent, unreadable or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


__all__ = ["atomic_directory", "atomic_file", "atomic_json", "atomic_text", "cache_dir", "read_json",
           "read_json_or_none"]
