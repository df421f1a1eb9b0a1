"""Task data in, examples out: read JSONL/CSV/TSV rows, render them through a template or a chat format, check labels.

    records = load_records("train.jsonl")                       # list of dicts, one per row
    examples, labels = build_examples(records, Template("Review: {text}\\nSentiment:", " {label}"), "classify")
    examples[0]  # Example(prompt="Review: great film\\nSentiment:", target=" positive", label="positive")

Every problem raises ``DataError`` with one message saying what is wrong, where (file, line, row) and what to do.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from softprompts.data.chat import ChatFormat
from softprompts.data.templates import Template
from softprompts.errors import DataError

PromptFormat = Template | ChatFormat  # what renders a row (see templates.py)

TASKS = ("classify", "generate")
# file suffix -> reader (Parquet, datasets directories and hub ids: ``sources.py``)
FILE_TYPES = {".jsonl": "jsonl", ".jsonlines": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
              ".tsv": "tsv"}
SPLITS = ("train", "dev", "test")
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


@dataclass(frozen=True)
class Example:
    prompt: str  # rendered template, e.g. "Review: great film\nSentiment:"
    target: str  # rendered target, e.g. " positive"
    label: str | None  # classification: the label value (e.g. "positive"); None for generation
    reference: str | None = None  # generation: what an output is scored against when not the target itself (a
    # chat row's answer, without the end-of-turn token its target ends with)


class _Records(list):
    """A list of row dicts that remembers the file line each row came from (for error messages)."""

    def __init__(self, rows: list[dict], lines: list[int], source: str):
        super().__init__(rows)
        self.lines = lines
        self.source = source


def _where(records: Sequence[dict], index: int, source: str) -> str:
    lines = getattr(records, "lines", None)
    if lines is not None and len(lines) == len(records):
        return f"row {index + 1} (line {lines[index]}) of {getattr(records, 'source', source)}"
    return f"row {index + 1} of {source}"


def _read_jsonl(path: Path, text: str) -> _Records:
    rows, lines = [], []
    # split on "\n" only: str.splitlines() also splits on U+2028, U+0085 etc., which occur inside JSON strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}, line {number}: malformed JSON ({exc.msg} at column {exc.colno}); each line must be one "
                'JSON object such as {"text": "...", "label": "..."}'
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}, line {number}: expected a JSON object with named fields, got {type(row).__name__}"
            )
        rows.append(row)
        lines.append(number)
    return _Records(rows, lines, str(path))


def _read_json_array(path: Path, text: str) -> _Records:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: a .json file must hold a list of objects (or one JSON object per line)")
    return _Records(data, [], str(path))


def _read_delimited(path: Path, text: str, delimiter: str) -> _Records:
    # TSV: no quoting (tabs and newlines cannot occur inside fields), so quote characters in text stay literal.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    if reader.fieldnames is None:
        raise DataError(f"{path} has no rows (not even a header line)")
    names = [n for n in reader.fieldnames]
    if any(not n or not n.strip() for n in names) or len(set(names)) != len(names):
        raise DataError(f"{path}, line 1: the header must name every column once, got {names}")
    rows, lines = [], []
    for row in reader:
        line = reader.line_num
        if None in row:
            raise DataError(
                f"{path}, line {line}: more columns than the header ({len(names)}: {', '.join(names)})"
            )
        if any(v is None for v in row.values()):
            if not any(v for v in row.values() if v is not None):
                continue
            raise DataError(
                f"{path}, line {line}: fewer columns than the header ({len(names)}: {', '.join(names)})"
            )
        rows.append(row)
        lines.append(line)
    return _Records(rows, lines, str(path))


def load_records(path: str | Path) -> list[dict]:
    """Rows of a .jsonl / .json / .csv / .tsv file (format chosen by extension) as dicts (every other form of data:
    ``sources.read_rows``)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory but not one written by datasets' save_to_disk; pass one data file "
                        "(.jsonl with one JSON object per line, .json, .csv or .tsv with a header row, .parquet)")
    suffix = path.suffix.lower()
    readers = FILE_TYPES
    if suffix not in readers:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; use .jsonl (one JSON object per line), "
            ".json, .csv or .tsv with a header row, or .parquet"
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None
    kind = readers[suffix]
    if kind == "json":
        kind = "json_array" if text.lstrip().startswith("[") else "jsonl"
    if kind == "jsonl":
        records = _read_jsonl(path, text)
    elif kind == "json_array":
        records = _read_json_array(path, text)
    else:
        records = _read_delimited(path, text, "," if kind == "csv" else "\t")
    if not records:
        raise DataError(f"{path} has no rows")
    return records


def label_targets(fmt: PromptFormat, labels: list[str]) -> list[str]:
    """The verbalization of each label (the target rendered with it), in the order of ``labels``."""
    return [fmt.verbalize(label) for label in labels]


def check_labels(fmt: PromptFormat, labels: list[str], source: str) -> list[str]:
    """The one label rule (training, evaluation, the server): at least two, unique, each rendering to its own
    non-blank target; ``DataError`` naming ``source`` otherwise."""
    labels = [str(label) for label in labels]
    if len(labels) < 2:
        raise DataError(f"classification needs at least two labels, got {labels} (from {source})")
    if len(set(labels)) != len(labels):
        raise DataError(f"labels must be unique, got {labels}")
    targets = label_targets(fmt, labels)
    if len(set(targets)) != len(targets) or any(not t.strip() for t in targets):
        raise DataError(f"labels must render to distinct, non-blank targets; {labels} render to {targets}")
    return labels


def build_examples(
    records: Sequence[dict],
    fmt: PromptFormat,
    task: str,
    labels: list[str] | None = None,
    source: str = "data",
) -> tuple[list[Example], list[str] | None]:
    """Render every row through ``fmt`` (a ``Template`` or a ``chat.ChatFormat``); for ``classify`` also check
    labels (default: the sorted unique values in the data).

    Returns ``(examples, labels)``; labels is None for ``generate``.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if not records:
        raise DataError(f"{source} has no rows")
    source = getattr(records, "source", source)
    for i, row in enumerate(records):
        if not isinstance(row, dict):
            raise DataError(
                f"{_where(records, i, source)} is a {type(row).__name__}, expected a dict of fields"
            )
        fmt.check_row(row, _where(records, i, source))
    if task == "generate":
        return [Example(*fmt.render(row), label=None, reference=fmt.reference(row)) for row in records], None

    if labels is None:
        labels = sorted({fmt.label_of(row) for row in records})
        labels = check_labels(fmt, labels, f"the labels in {source}")
    else:
        labels = check_labels(fmt, list(labels), "the labels given")
    allowed = set(labels)
    examples = []
    for i, row in enumerate(records):
        value = fmt.label_of(row)
        if value not in allowed:
            raise DataError(
                f"label {value!r} in {_where(records, i, source)} is not one of the allowed labels "
                f"{', '.join(map(repr, labels))}; fix the row or pass the full label set"
            )
        prompt, _ = fmt.render(row)
        examples.append(Example(prompt, fmt.verbalize(value), value))
    return examples, labels


def is_chat(records: Sequence[dict]) -> bool:
    """Whether rows are chat examples (their first row holds ``messages``)."""
    return bool(records) and isinstance(records[0], dict) and "messages" in records[0]


def bundled_names() -> list[str]:
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if p.is_dir() and (p / "train.jsonl").is_file())


def bundled_path(name: str, split: str) -> Path:
    """Path of a bundled dataset split, e.g. ``bundled_path("uci_sentiment", "train")`` (``-`` or ``_`` both work)."""
    folder = name.replace("-", "_")
    names = bundled_names()
    if folder not in names:
        raise DataError(f"no bundled dataset {name!r}; bundled: {', '.join(names)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return BUNDLED_DIR / folder / f"{split}.jsonl"
