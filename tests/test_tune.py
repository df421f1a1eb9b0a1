"""``softprompts tune`` on a tiny model: a study killed with SIGKILL continues on a rerun (finished trials kept, the
budget total), weak trials are pruned at the loop's evaluations, bad budgets/ranges/dev data are refused before the
model loads, and ``best/`` is an ordinary adapter whose dev metric is the best trial's."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from tiny import save_tiny

import softprompts.model.load
import softprompts.training.loop
from softprompts.cli import main

TEMPLATE = ["--template", "Review: {text}\\nSentiment:", "--target", " {label}"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    model = save_tiny("llama", root / "llama")
    rows = [{"text": ("nice " if i % 2 else "poor ") + "y" * (i % 5), "label": "pos" if i % 2 else "neg"}
            for i in range(12)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    empty = root / "empty.jsonl"
    empty.write_text("")
    return {"root": root, "model": model, "data": data, "empty": empty}


def tune_args(env, out: Path, *extra: str, method: str = "prompt") -> list[str]:
    return ["tune", "--model", str(env["model"]), "--method", method, "--data", str(env["data"]), "--eval-data",
            str(env["data"]), *TEMPLATE, "--virtual-tokens-choices", "2,3", "--out", str(out), *extra]


def trials_of(out: Path) -> list:
    storage = f"sqlite:///{out / 'study.db'}"
    return optuna.load_study(study_name="softprompts-tune", storage=storage).get_trials(deepcopy=False)


def states(db: Path) -> list[str]:
    """The trials' states in the study file, read with sqlite while another process writes it."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return [row[0] for row in conn.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.OperationalError:  # the schema is not there yet
        return []


@pytest.mark.slow  # a CLI subprocess killed with SIGKILL; the in-process twin below stays in test-fast
def test_a_killed_study_continues_where_it_stopped(env, tmp_path):
    out = tmp_path / "study"
    args = tune_args(env, out, "--trials", "4", "--steps", "60", "--eval-every", "20", "--pruner", "none")
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "softprompts", *args], env=environ, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while states(out / "study.db")[-1:] != ["RUNNING"] or "COMPLETE" not in states(out / "study.db"):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    time.sleep(0.3)  # into the second trial's training
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: t for t in trials_of(out) if t.state == optuna.trial.TrialState.COMPLETE}
    assert 1 <= len(before) < 4, "the kill must land between the first and the last trial"

    assert main(args) == 0
    assert_continued(out, before, budget=4)


def assert_continued(out: Path, before: dict, budget: int) -> None:
    """After the rerun: the budget counts the whole study; the trials finished ``before`` it are kept as they were;
    the one the kill interrupted is marked FAIL, its files gone and its parameters tried again."""
    trials = trials_of(out)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == budget  # the budget counts the whole study, not this run
    for number, trial in before.items():  # finished trials are kept as they were, not run again
        assert trials[number].datetime_complete == trial.datetime_complete and trials[number].value == trial.value
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and len(trials) == budget + 1  # the trial the kill interrupted, marked FAIL by the rerun
    for stale in failed:  # the trial the kill interrupted: its files gone, its parameters tried again
        assert not (out / "trials" / f"{stale.number:03d}").exists()
        retry = [t for t in trials if t.user_attrs.get("retry_of") == stale.number]
        assert len(retry) == 1 and retry[0].params == stale.params and retry[0].state.is_finished()
    assert json.loads((out / "best.json").read_text())["finished_trials"] == budget


class Killed(BaseException):
    """Stands in for SIGKILL: neither optuna nor the CLI catches it, so the trial it stops stays RUNNING."""


def test_a_study_stopped_in_process_continues_where_it_stopped(env, tmp_path, monkeypatch):
    """In-process twin of the SIGKILL test (test-fast): the run dies at step 2 of the second trial (its trial left
    RUNNING, as a kill leaves it); the rerun keeps the first, retries the second's parameters, ends the budget."""
    out = tmp_path / "study"
    args = tune_args(env, out, "--trials", "3", "--steps", "4", "--eval-every", "2", "--pruner", "none")
    real, steps = softprompts.training.loop.check_step, []

    def die_in_the_second_trial(*args):
        steps.append(args[0])
        if len(steps) == 4 + 2:
            raise Killed
        real(*args)

    monkeypatch.setattr(softprompts.training.loop, "check_step", die_in_the_second_trial)
    with pytest.raises(Killed):
        main(args)
    monkeypatch.setattr(softprompts.training.loop, "check_step", real)
    assert [t.state.name for t in trials_of(out)] == ["COMPLETE", "RUNNING"]
    before = {t.number: t for t in trials_of(out) if t.state == optuna.trial.TrialState.COMPLETE}
    assert main(args) == 0
    assert_continued(out, before, budget=3)


def test_a_weak_trial_is_pruned_at_the_first_evaluation(env, tmp_path, monkeypatch):
    """A deterministic dev metric (0.9 for lr > 1e-2, else 0.1): the second, weak trial is below the first at the
    first rung (step 2), so successive halving stops it there, after 2 of its 8 steps."""

    def fake_dev_score(base, artifact, dev, spec, config, dist):
        return {"accuracy": 0.0 if artifact is None else 0.9 if config.lr > 1e-2 else 0.1, "n": len(dev)}

    monkeypatch.setattr(softprompts.training.loop, "dev_score", fake_dev_score)
    out = tmp_path / "pruned"
    out.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="softprompts-tune",
                                direction="maximize")
    study.enqueue_trial({"lr": 5e-2, "num_virtual_tokens": 2})
    study.enqueue_trial({"lr": 1e-4, "num_virtual_tokens": 2})
    assert main(tune_args(env, out, "--trials", "2", "--steps", "8", "--eval-every", "2", "--lr-range",
                          "1e-5,1e-1")) == 0
    strong, weak = trials_of(out)
    assert strong.state == optuna.trial.TrialState.COMPLETE and strong.value == pytest.approx(0.9)
    assert weak.state == optuna.trial.TrialState.PRUNED and weak.params["lr"] == pytest.approx(1e-4)
    record = json.loads((out / "trials" / "001" / "training.json").read_text())
    assert record["stopped_early"] and record["steps_done"] == 2 < 8
    assert json.loads((out / "trials" / "000" / "training.json").read_text())["steps_done"] == 8
    row = next(line for line in (out / "tune.md").read_text().splitlines() if line.startswith("| 1 |"))
    assert "| pruned |" in row and "| 2 |" in row


@pytest.mark.parametrize("extra, needle", [
    (["--trials", "0"], "--trials must be a positive integer"),
    (["--minutes", "0"], "--minutes must be a positive number"),
    (["--trials", "2", "--minutes", "-1"], "--minutes must be a positive number"),
    ([], "give a budget"),
    (["--trials", "2", "--lr-range", "1e-1,1e-4"], "0 < LO < HI"),
    (["--trials", "2", "--lr-range", "0,1e-2"], "0 < LO < HI"),
    (["--trials", "2", "--virtual-tokens-choices", "0,8"], "positive integers"),
    (["--trials", "2", "--eval-every", "0"], "no trial can be stopped early"),
    (["--trials", "2", "--steps", "0"], "--steps must be a positive integer"),
])
def test_bad_budgets_and_ranges_are_refused_before_the_model_loads(env, tmp_path, monkeypatch, capsys, extra,
                                                                   needle):
    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the input was checked")

    monkeypatch.setattr(softprompts.model.load, "load_base", no_load)
    args = tune_args(env, tmp_path / "out", *extra)
    if "--virtual-tokens-choices" in extra:  # the later flag wins: drop the default one
        i = args.index("--virtual-tokens-choices")
        del args[i : i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, needle", [
    ("no dev", "give --eval-data"),
    ("empty dev", "empty"),
    ("cartridge", "frozen_tokens (1) must be below num_virtual_tokens"),
])
def test_no_dev_rows_or_a_choice_the_method_refuses_is_one_error(env, tmp_path, monkeypatch, capsys, case, needle):
    monkeypatch.setattr(softprompts.model.load, "load_base", lambda *a, **k: pytest.fail("the model loaded"))
    args = tune_args(env, tmp_path / "out", "--trials", "2",
                     method="cartridge" if case == "cartridge" else "prompt")
    if case == "no dev":
        del args[args.index("--eval-data") : args.index("--eval-data") + 2]
    elif case == "empty dev":
        args[args.index("--eval-data") + 1] = str(env["empty"])
    else:
        args[args.index("--virtual-tokens-choices") + 1] = "1,4"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_best_is_an_adapter_scoring_the_best_trials_dev_metric(env, tmp_path):
    from softprompts.adapter_io import load_adapter
    from softprompts.model.load import load_base
    from softprompts.training import Distributed, TrainConfig
    from softprompts.training.loop import dev_score
    from softprompts.workflow import TaskFlags, load_task

    out = tmp_path / "best"
    assert main(tune_args(env, out, "--trials", "3", "--steps", "6", "--eval-every", "2", "--seed", "3",
                          method="prefix")) == 0
    best = json.loads((out / "best.json").read_text())
    complete = [t for t in trials_of(out) if t.state == optuna.trial.TrialState.COMPLETE]
    top = max(t.value for t in complete)
    if best["defaults_kept"]:  # 12 dev rows: a lead is within noise, and the defaults (trial 0) stay
        assert best["trial"] == 0 and trials_of(out)[0].user_attrs["defaults"] and top - best["value"] < 0.5
        assert "within noise, so the defaults are kept" in (out / "tune.md").read_text()
    else:
        assert best["value"] == top
    assert best["params"] == trials_of(out)[best["trial"]].params
    base = load_base(str(env["model"]))
    adapter = load_adapter(out / "best", base)
    assert adapter.method == "prefix" and adapter.artifact.length == best["params"]["num_virtual_tokens"]
    flags = TaskFlags("classify", template="Review: {text}\nSentiment:", target=" {label}")
    spec, _, (dev,) = load_task(flags, env["data"], [env["data"]], lambda: base.tokenizer)
    assert dev_score(base, adapter.artifact, dev, spec, TrainConfig(), Distributed())["accuracy"] == best["value"]
    for name in ("tune.md", "trials.png"):
        assert (out / name).stat().st_size > 0
    assert f"| {best['trial']} |" in (out / "tune.md").read_text()


def test_residual_searches_its_bottleneck_and_shared_or_separate_mlps(env, tmp_path):
    """Residual prompt tuning declares its own knobs: a trial queued with a per-token MLP (``shared`` false) of
    bottleneck 100 trains ``P*d + P*(2*d*m + m + 3*d)`` parameters (``P`` MLPs), as the method's docstring counts."""
    from softprompts.model.load import load_base

    out = tmp_path / "residual"
    out.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="softprompts-tune",
                                direction="maximize")
    study.enqueue_trial({"lr": 1e-2, "num_virtual_tokens": 3, "bottleneck": 100, "shared": False})
    assert main(tune_args(env, out, "--trials", "1", "--steps", "2", "--eval-every", "1", method="residual")) == 0
    (trial,) = trials_of(out)
    assert trial.params == {"lr": 1e-2, "num_virtual_tokens": 3, "bottleneck": 100, "shared": False}
    config = json.loads((out / "trials" / "000" / "training.json").read_text())["method_config"]
    assert config["shared"] is False and config["bottleneck"] == 100
    d, p, m = load_base(str(env["model"])).shapes.hidden_size, 3, 100
    assert trial.user_attrs["trainable_parameters"] == p * d + p * (2 * d * m + m + 3 * d)
    assert "shared True/False" in (out / "tune.md").read_text()


def test_a_new_study_tries_the_defaults_first(env, tmp_path):
    """The first trial of a new study is the method's defaults (lr, P and its own knobs where the space holds them),
    so the best trial is never below the defaults on dev; a space without the default leaves that value to the
    sampler."""
    from softprompts.compare import CompareConfig
    from softprompts.compare.tuning import space_of
    from softprompts.methods import ResidualPrompt, ResidualPromptConfig

    out = tmp_path / "defaults"
    assert main(tune_args(env, out, "--trials", "2", "--steps", "2", "--eval-every", "1", method="residual")) == 0
    first = trials_of(out)[0]
    assert first.params["lr"] == ResidualPrompt.default_lr
    assert first.params["bottleneck"] == ResidualPromptConfig.bottleneck
    assert first.params["shared"] is ResidualPromptConfig.shared
    assert "num_virtual_tokens" in first.params  # P from 2,3 (the default 20 is outside): the sampler's
    assert first.user_attrs["defaults"] is True and "defaults" not in trials_of(out)[1].user_attrs
    lora = space_of(CompareConfig(model="m", methods=["prompt"], tune=2), "lora")
    assert lora.first_trial() == {"lr": 3e-4, "r": 8}


def test_a_lead_within_dev_noise_keeps_the_defaults():
    """One seed, accuracy on n dev rows: a trial replaces the defaults only when it leads by 2 standard errors of the
    difference (binomial); other metrics have no noise model, and the top trial wins."""
    from types import SimpleNamespace

    from softprompts.training.tune_report import defaults_kept

    defaults = SimpleNamespace(number=0, value=0.89)
    close, far = SimpleNamespace(number=3, value=0.91), SimpleNamespace(number=4, value=0.99)
    reason = defaults_kept(close, defaults, "accuracy", 100)
    assert "within noise" in reason and "100 dev rows" in reason and "2.0 points" in reason
    assert defaults_kept(close, defaults, "accuracy", 100_000) is None  # the same lead on many rows is real
    assert defaults_kept(far, defaults, "accuracy", 100) is None
    assert defaults_kept(close, defaults, "chrf", 100) is None
    assert defaults_kept(close, None, "accuracy", 100) is None
    assert defaults_kept(defaults, defaults, "accuracy", 100) is None
