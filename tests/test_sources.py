"""Data in the forms people have it (``data/sources.py``): Parquet, ``save_to_disk`` directories (one split or a
DatasetDict), ``datasets.Dataset`` objects, lists of dicts, hub ids; class labels read as their names; clear errors."""

from __future__ import annotations

import json

import pytest

import softprompts.data.sources as sources
from softprompts.cli import main
from softprompts.data.sources import load_task_data, read_rows
from softprompts.data.templates import Template
from softprompts.errors import DataError

datasets = pytest.importorskip("datasets")

ROWS = [{"text": "great film", "label": 1}, {"text": "dull", "label": 0}, {"text": "fine", "label": 1}]
NAMED = [{"text": "great film", "label": "positive"}, {"text": "dull", "label": "negative"},
         {"text": "fine", "label": "positive"}]


def dataset(rows=ROWS):
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    return datasets.Dataset.from_list(rows, features=features)


def test_dataset_object_and_lists():
    assert read_rows(dataset()) == NAMED  # class labels come back as their names
    assert read_rows(NAMED) == NAMED
    with pytest.raises(DataError, match="row 2 of the rows given is a str"):
        read_rows([{"text": "a"}, "b"])
    with pytest.raises(DataError, match="DatasetDict holds several splits \\(train, test\\)"):
        read_rows(datasets.DatasetDict({"train": dataset(), "test": dataset()}))
    with pytest.raises(DataError, match="empty"):
        read_rows([])


def test_parquet_file(tmp_path):
    path = tmp_path / "train.parquet"
    dataset().to_parquet(str(path))
    assert read_rows(path) == NAMED  # the features datasets recorded in the file's schema
    plain = tmp_path / "plain.parquet"
    datasets.Dataset.from_list(NAMED).to_parquet(str(plain))
    assert read_rows(str(plain)) == NAMED
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        read_rows(broken)
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "missing.parquet")


def test_save_to_disk_directories(tmp_path):
    dataset().save_to_disk(str(tmp_path / "one"))
    assert read_rows(tmp_path / "one") == NAMED
    with pytest.raises(DataError, match="holds one split; drop ':train'"):
        read_rows(f"{tmp_path / 'one'}:train")
    datasets.DatasetDict({"train": dataset(), "test": dataset(ROWS[:1])}).save_to_disk(str(tmp_path / "dict"))
    assert read_rows(f"{tmp_path / 'dict'}:test") == NAMED[:1]
    with pytest.raises(DataError, match="holds the splits train, test; name one"):
        read_rows(tmp_path / "dict")
    with pytest.raises(DataError, match="no split 'dev'; its splits: train, test"):
        read_rows(f"{tmp_path / 'dict'}:dev")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        read_rows(tmp_path / "plain")


def test_hub_ids_fail_fast_with_advice(monkeypatch):
    monkeypatch.setattr(sources, "hub_unreachable", lambda: "the hub (huggingface.co) cannot be reached from here")
    with pytest.raises(DataError, match="imdb:test: no such file or directory, and as a Hugging Face dataset id it "
                                        "cannot be downloaded: the hub"):
        read_rows("imdb:test")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE=1"):
        read_rows("someone/some-dataset")


def test_bad_rows_are_named(tmp_path):
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([{"text": "a", "label": "x"}, {"body": "b", "label": "y"}]).to_parquet(str(path))
    with pytest.raises(DataError, match="template field 'text' is null in row 2 of"):
        load_task_data(path, Template("{text}", " {label}"), "classify")
    examples, labels = load_task_data(dataset(), Template("Review: {text}", " {label}"), "classify")
    assert labels == ["negative", "positive"] and examples[0].target == " positive"


def test_cli_trains_on_a_dataset_directory(tmp_path, capsys):
    """``--data DIR:split`` end to end on a tiny model (the CLI reads every form through the same reader)."""
    from tiny import save_tiny

    model = save_tiny("llama", tmp_path / "model")
    datasets.DatasetDict({"train": dataset(ROWS * 4), "dev": dataset()}).save_to_disk(str(tmp_path / "data"))
    rc = main(["train", "--model", str(model), "--data", f"{tmp_path / 'data'}:train", "--eval-data",
               f"{tmp_path / 'data'}:dev", "--task", "classify", "--template", "Review: {text}\nSentiment:",
               "--target", " {label}",
               "--steps", "2", "--batch-size", "2", "--virtual-tokens", "2", "--out", str(tmp_path / "out"),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    task = json.loads((tmp_path / "out" / "adapter.json").read_text())["task"]
    assert task["labels"] == ["negative", "positive"]
