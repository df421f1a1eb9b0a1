"""``compare --tune N`` on a tiny model: each method (prompt, prefix) and PEFT LoRA is searched with N trials in its own
study (``OUT/tune/<method>/study.db``), every compared run uses its study's best configuration (results.json records
it and the run's own numbers agree), a rerun trains no new trial, and a bad N is refused before the model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny import save_tiny

from softprompts.cli import main
from softprompts.data.datasets import bundled_path

optuna = pytest.importorskip("optuna")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

TEMPLATE = r"Review: {text}\nSentiment:"
TUNED = ("prompt", "prefix", "lora")


def _data(root: Path, split: str, n: int) -> Path:
    path = root / f"{split}-{n}.jsonl"
    path.write_text("\n".join(bundled_path("uci_sentiment", split).read_text().splitlines()[:n]) + "\n")
    return path


def _args(model: Path, root: Path, *extra: str, train: int = 16, dev: int | None = 6) -> list[str]:
    data = ["--data", str(_data(root, "train", train)), "--test-data", str(_data(root, "test", 6))]
    if dev:
        data += ["--eval-data", str(_data(root, "dev", dev))]
    return ["compare", "--model", str(model), *data, "--template", TEMPLATE, "--target", " {label}",
            "--methods", "prompt,prefix", "--steps", "4", "--eval-every", "2", "--batch-size", "4",
            "--latency-tokens", "2", "--no-progress", "--out", str(root / "out"), *extra]


def _trials(out: Path, method: str) -> list:
    storage = f"sqlite:///{out / 'tune' / method / 'study.db'}"
    return optuna.load_study(study_name="softprompts-tune", storage=storage).get_trials(deepcopy=False)


def _best(trials: list):
    """The study's best trial as ``tune`` picks it: the highest dev metric, the earlier trial on a tie."""
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return max(complete, key=lambda t: (t.value, -t.number))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-tune")
    model = save_tiny("llama", root / "model")
    args = _args(model, root, "--tune", "2", "--baseline", "peft")
    assert main(args) == 0
    return root / "out", args


def test_each_method_and_lora_gets_n_trials(tuned):
    out, _ = tuned
    for method in TUNED:
        trials = _trials(out, method)
        finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
        assert len(finished) == len(trials) == 2, method
        assert (out / "tune" / method / "best.json").is_file() and (out / "tune" / method / "tune.md").is_file()
    assert set(_trials(out, "lora")[0].params) == {"lr", "r"}
    assert set(_trials(out, "prefix")[0].params) == {"lr", "num_virtual_tokens", "projection_hidden"}


def test_the_compared_runs_use_the_best_trials_configuration(tuned):
    out, _ = tuned
    results = json.loads((out / "results.json").read_text())
    runs = {("peft:" if r["impl"] == "peft" else "") + r["method"]: r for r in results["runs"]}
    assert set(runs) == {"prompt", "prefix", "peft:prompt", "peft:prefix", "peft:lora"}
    for label, run in runs.items():
        method = run["method"]
        best = _best(_trials(out, method))
        assert run["tuned"]["params"] == best.params and run["tuned"]["trial"] == best.number, label
        assert run["tuned"]["budget"] == 2 and run["tuned"]["finished"] == 2
        assert run["lr"] == pytest.approx(best.params["lr"]), label  # the lr the run trained with
    for method in ("prompt", "prefix"):  # our runs: the chosen P and knobs are the adapter's
        record = json.loads((out / "runs" / f"{method}-seed0" / "adapter" / "training.json").read_text())
        options = {k: v for k, v in _best(_trials(out, method)).params.items() if k != "lr"}
        assert {k: record["method_config"][k] for k in options} == options
        assert runs[method]["virtual_tokens"] == options["num_virtual_tokens"]
    assert runs["peft:lora"]["lora_rank"] == _best(_trials(out, "lora")).params["r"]
    assert set(results["tuning"]) == {"prompt", "prefix", "peft:lora"}
    report = (out / "report.md").read_text()
    assert "## Tuning" in report and "| prompt (tuned) |" in report and "| peft:lora (tuned) |" in report
    assert results["recommendation"]["text"][0].startswith("**Tuned runs:** every method and PEFT LoRA")
    assert f"LoRA (rank {runs['peft:lora']['lora_rank']} on every linear layer" in report


def test_a_rerun_trains_no_new_trial(tuned):
    """Every run finished: nothing trains. Two runs' results removed: they are redone in the configuration their
    finished study chose, without a new trial."""
    out, args = tuned
    before = {m: [(t.number, t.datetime_complete) for t in _trials(out, m)] for m in TUNED}
    chosen = {r["method"]: r["tuned"] for r in json.loads((out / "results.json").read_text())["runs"]
              if r["impl"] == "softprompts" or r["method"] == "lora"}
    assert main(args) == 0
    shutil.rmtree(out / "runs" / "prompt-seed0")
    shutil.rmtree(out / "runs" / "peft-lora-seed0")
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["resume"]["ran"]) == {"prompt-seed0", "peft-lora-seed0"}
    assert {m: [(t.number, t.datetime_complete) for t in _trials(out, m)] for m in TUNED} == before
    again = {r["method"]: r["tuned"] for r in results["runs"] if r["impl"] == "softprompts" or r["method"] == "lora"}
    assert again == chosen


@pytest.fixture
def no_model(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model loaded")

    for target in ("softprompts.model.load.load_base", "softprompts.compare.runner.load_base"):
        monkeypatch.setattr(target, load)


@pytest.mark.parametrize("extra, needle", [
    (["--tune", "0"], "--tune takes the number of trials each method (and LoRA) is tuned with, a positive integer; "
                      "got 0"),
    (["--tune", "-3"], "a positive integer; got -3"),
    (["--tune", "2", "--lr", "0.01"], "--lr fixes the learning rate that --tune searches"),
])
def test_bad_n_refused_before_the_model_loads(tmp_path, capsys, no_model, extra, needle):
    assert main(_args(tmp_path / "model", tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out" / "tune").exists()


def test_tune_without_dev_rows_refused_only_when_none_are_carved(tmp_path, capsys, monkeypatch, no_model):
    """6 training rows and no dev: nothing to carve, refused. 16 rows: 2 are carved and the compare goes on (to the
    model, which this test forbids)."""
    assert main(_args(tmp_path / "model", tmp_path, "--tune", "2", train=6, dev=None)) == 2
    assert "--tune N chooses each method's configuration on dev rows" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="the model loaded"):
        main(_args(tmp_path / "model", tmp_path, "--tune", "2", train=16, dev=None))
