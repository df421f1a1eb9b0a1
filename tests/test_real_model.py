"""The real commands on the embedded SmolLM2 with the bundled sentiment data (short: 20 steps, 64 examples)."""

from __future__ import annotations

import json

import pytest

from softprompts.cli import main
from softprompts.data.datasets import bundled_path

pytestmark = pytest.mark.slow


def head(split: str, n: int, path) -> str:
    lines = bundled_path("uci_sentiment", split).read_text().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_train_eval_generate_on_smollm2(tmp_path, capsys):
    train = head("train", 64, tmp_path / "train.jsonl")
    test = head("test", 64, tmp_path / "test.jsonl")
    out = tmp_path / "adapter"
    rc = main(["train", "--method", "prompt", "--data", train, "--eval-data", test, "--template",
               "Review: {text}\\nSentiment:", "--target", " {label}", "--labels", "negative,positive",
               "--steps", "20", "--eval-every", "10", "--out", str(out), "--no-progress"])
    assert rc == 0
    record = json.loads((out / "training.json").read_text())
    bare = record["base_model_dev"]["accuracy"]
    assert bare > 0.7  # SmolLM2-Instruct already knows sentiment (0.90 on the full test split)

    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--data", test, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 64
    assert metrics["accuracy"] >= bare - 0.05 and metrics["accuracy"] > 0.75
    assert metrics["accuracy"] == pytest.approx(record["best_dev"])  # the kept adapter is the best one on dev

    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "3", "A wonderful, moving film."]) == 0
    text = capsys.readouterr().out.strip()
    assert text and "positive" in text.lower()
