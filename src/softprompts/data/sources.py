"""Where rows come from, in every form people have them: files, ``datasets`` objects and directories, hub ids.

    read_rows("train.jsonl")            # .jsonl / .json (an array, or one object per line) / .csv / .tsv
    read_rows("train.parquet")          # Parquet (pyarrow)
    read_rows("saved/")                 # a directory written by datasets.Dataset.save_to_disk
    read_rows("saved_dict/:validation") # one split of a DatasetDict.save_to_disk directory
    read_rows(dataset)                  # a datasets.Dataset object (or a list of dicts)
    read_rows("imdb:test")              # a Hugging Face dataset id, ``name`` (split train) or ``name:split``

Class-label columns (``datasets.ClassLabel``) come back as their names, so ``label: 0`` reads as ``"negative"``.
Parquet, ``datasets`` directories and hub ids need the ``datasets`` library (``pip install 'softprompts[hf]'``);
without it, or without a reachable hub for an id that is not cached, the error says so in one line. Every other
problem is the same ``DataError`` as for files: what is wrong, where, what to do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from softprompts.data.datasets import FILE_TYPES, Example, PromptFormat, build_examples, load_records
from softprompts.errors import DataError
from softprompts.model.load import hub_unreachable

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SAVED_MARKERS = ("dataset_info.json", "state.json")  # Dataset.save_to_disk
DICT_MARKER = "dataset_dict.json"  # DatasetDict.save_to_disk


def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {what} needs the datasets library: pip install 'softprompts[hf]' (or pass a .jsonl, "
                        ".json, .csv or .tsv file)") from None
    return datasets


def _named_labels(dataset) -> list[dict]:
    """Rows of a ``datasets.Dataset``, class-label integers replaced by their names."""
    rows = dataset.to_list()
    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        if type(feature).__name__ == "ClassLabel":
            for row in rows:
                if isinstance(row.get(name), int) and row[name] >= 0:
                    row[name] = feature.int2str(row[name])
    return rows


def _from_object(source: Any) -> list[dict]:
    if isinstance(source, dict) and source and all(hasattr(v, "to_list") for v in source.values()):
        raise DataError(f"a DatasetDict holds several splits ({', '.join(source)}); pass one of them, e.g. "
                        f"dataset[{next(iter(source))!r}]")
    if hasattr(source, "to_list") and hasattr(source, "features"):
        return _named_labels(source)
    if type(source).__name__ == "IterableDataset":
        raise DataError("an IterableDataset (streaming=True) cannot be read whole; load it with streaming=False")
    if isinstance(source, Sequence) and not isinstance(source, str | bytes):
        bad = next((i for i, row in enumerate(source) if not isinstance(row, dict)), None)
        if bad is not None:
            raise DataError(f"row {bad + 1} of the rows given is a {type(source[bad]).__name__}, expected a dict of "
                            "fields")
        return list(source)
    raise DataError(f"cannot read rows from a {type(source).__name__}; pass a file path, a datasets.Dataset or a "
                    "list of dicts")


def _saved(path: Path, split: str | None, text: str) -> list[dict]:
    datasets = _datasets(f"{path} (a datasets directory)")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; one clear line
        raise DataError(f"{text}: cannot load it with datasets.load_from_disk ({exc})") from None
    if hasattr(loaded, "to_list"):
        if split is not None:
            raise DataError(f"{path} holds one split; drop ':{split}'")
        return _named_labels(loaded)
    splits = list(loaded.keys())
    if split is None:
        raise DataError(f"{path} holds the splits {', '.join(splits)}; name one: {path}:{splits[0]}")
    if split not in loaded:
        raise DataError(f"{path} has no split {split!r}; its splits: {', '.join(splits)}")
    return _named_labels(loaded[split])


def _hub(name: str, split: str | None, text: str) -> list[dict]:
    reason = hub_unreachable()
    if reason is not None and "HF_HUB_OFFLINE" not in reason:  # offline mode: datasets may still have it cached
        raise DataError(f"{text}: no such file or directory, and as a Hugging Face dataset id it cannot be downloaded: "
                        f"{reason} (set HF_HUB_OFFLINE=1 to use a copy in the datasets cache); pass a local file "
                        "(.jsonl, .json, .csv, .tsv, .parquet) or a save_to_disk directory")
    datasets = _datasets(f"the hub dataset {name!r}")
    try:
        return _named_labels(datasets.load_dataset(name, split=split or "train"))
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; one clear line
        raise DataError(f"{text}: no such file or directory, and loading it as a Hugging Face dataset id failed "
                        f"({type(exc).__name__}: {str(exc)[:300]}); pass a local file (.jsonl, .json, .csv, .tsv, "
                        ".parquet) or a save_to_disk directory") from None


def read_rows(source: str | Path | Any) -> list[dict]:
    """The rows of ``source`` (see the module docstring for the forms)."""
    if not isinstance(source, str | Path):
        rows = _from_object(source)
        if not rows:
            raise DataError("the rows given are empty")
        return rows
    text = str(source)
    path = Path(text)
    if path.suffix.lower() == ".parquet":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        return _parquet(path)
    if path.is_dir():
        if (path / DICT_MARKER).is_file() or any((path / m).is_file() for m in SAVED_MARKERS):
            return _saved(path, None, text)
        return load_records(path)  # the files' reader says what a directory must be
    head, _, split = text.rpartition(":")
    if head and split and Path(head).is_dir():
        return _saved(Path(head), split, text)
    if path.suffix.lower() in (*FILE_TYPES, ".parquet") or "\\" in text or text.startswith((".", "/", "~")):
        return load_records(path)  # a file path: its reader names what is wrong (no such file, type, ...)
    name, split_ = (head, split) if head and HUB_ID.match(head) else (text, None)
    if HUB_ID.match(name):
        return _hub(name, split_, text)
    return load_records(path)


def _parquet(path: Path) -> list[dict]:
    datasets = _datasets(f"{path} (Parquet)")
    import pyarrow.parquet as pq  # installed with datasets

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
        raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {str(exc)[:200]})") from None
    if table.num_rows == 0:
        raise DataError(f"{path} has no rows")
    try:  # a file written by datasets records its features (class-label names) in the schema
        features = datasets.Features.from_arrow_schema(table.schema)
    except Exception:  # noqa: BLE001 - no or foreign metadata: plain columns
        features = {}
    return _named_labels(_Table(table.to_pylist(), features))


class _Table:
    """Parquet rows with the features datasets recorded, read like a ``datasets.Dataset``."""

    def __init__(self, rows: list[dict], features) -> None:
        self.rows, self.features = rows, features

    def to_list(self) -> list[dict]:
        return self.rows


def load_task_data(source, fmt: PromptFormat, task: str, labels: list[str] | None = None
                   ) -> tuple[list[Example], list[str] | None]:
    """``read_rows`` + ``build_examples``: examples from any source form."""
    return build_examples(read_rows(source), fmt, task, labels, source=str(source) if isinstance(source, str | Path)
                          else type(source).__name__)


__all__ = ["load_task_data", "read_rows"]
