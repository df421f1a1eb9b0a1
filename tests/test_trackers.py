"""``--report-to``: what the trackers wrote, read back with their own readers, equals ``training.json``; a resumed run
continues the same tracker run without a duplicated step; a tracker that is not installed is refused before training
with the extra that installs it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_base

from softprompts.cli import main
from softprompts.data.datasets import Example
from softprompts.errors import SoftpromptsError
from softprompts.methods import create_method
from softprompts.tasks import TaskSpec
from softprompts.training import TrainConfig, checkpoint_path, lr_factor, train
from softprompts.training.trackers import RunPlace, Trackers, keep_logs, only_logs

SPEC = TaskSpec("classify", "Review: {text}\nSentiment:", " {label}", ["neg", "pos"], max_prompt_tokens=40)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def llama():
    return tiny_base("llama")


def examples(n: int) -> list[Example]:
    words = ["good fun", "bad", "great film", "awful", "fine", "terrible plot"]
    return [Example(f"Review: {words[i % 6]}{'!' * (i % 3)}\nSentiment:",
                    " neg" if words[i % 6] in ("bad", "awful", "terrible plot") else " pos",
                    "neg" if words[i % 6] in ("bad", "awful", "terrible plot") else "pos") for i in range(n)]


def config(**kw) -> TrainConfig:
    base = dict(steps=6, lr=0.1, batch_size=4, eval_every=3, checkpoint_every=0, progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


def run(llama, out: Path | None, cfg: TrainConfig, **kw):
    method = create_method(llama, "prefix", num_virtual_tokens=3, seed=0)
    return train(llama, method, examples(12), SPEC, cfg, dev_examples=examples(6), out_dir=out, **kw)


def losses(record: dict) -> list[tuple[int, float]]:
    return [(p["step"], p["loss"]) for p in record["curve"] if p["loss"] is not None]


def dev_points(record: dict) -> list[tuple[int, float]]:
    return [(p["step"], p["dev_accuracy"]) for p in record["curve"] if "dev_accuracy" in p]


def tensorboard(directory: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def mlflow_runs(directory: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{directory / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("softprompts")
    return client, client.search_runs([experiment.experiment_id])


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def same_curve(read: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Equal steps, equal values (TensorBoard keeps float32)."""
    return [s for s, _ in read] == [s for s, _ in expected] and all(
        v == pytest.approx(e, rel=1e-6, abs=1e-7) for (_, v), (_, e) in zip(read, expected, strict=True))


def test_tensorboard_and_mlflow_hold_training_json(llama, tmp_path):
    out = tmp_path / "run"
    cfg = config(report_to="tensorboard,mlflow")
    record = run(llama, out, cfg).record
    assert json.loads((out / "training.json").read_text()) == record and (out / "adapter.json").is_file()

    board = out / "tensorboard"
    assert same_curve(tensorboard(board, "train/loss"), losses(record))
    assert same_curve(tensorboard(board, "dev/accuracy"), dev_points(record))
    assert [s for s, _ in dev_points(record)] == [0, 3, 6]
    expected_lr = [(s, cfg.lr * lr_factor(s - 1, cfg)) for s, _ in losses(record)]
    assert same_curve(tensorboard(board, "train/lr"), expected_lr)
    assert tensorboard(board, "final/best_dev")[0][1] == pytest.approx(record["best_dev"])
    assert all(v > 0 for _, v in tensorboard(board, "train/grad_norm"))

    client, runs = mlflow_runs(out)
    assert len(runs) == 1 and runs[0].info.run_name == "run" and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert same_curve(history(client, run_id, "train/loss"), losses(record))
    assert same_curve(history(client, run_id, "dev/accuracy"), dev_points(record))
    assert runs[0].data.metrics["final/best_dev"] == pytest.approx(record["best_dev"])
    params = runs[0].data.params
    assert params["train.lr"] == "0.1" and params["method"] == "prefix" and params["virtual_tokens"] == "3"
    assert int(params["trainable_parameters"]) == record["trainable_parameters"]
    assert int(params["adapter_parameters"]) > 0


def test_resumed_run_continues_the_same_tracker_run(llama, tmp_path):
    """Interrupted after step 5 (checkpoint at step 4, steps 5 logged already), resumed: one curve, steps 1..8 once
    each, equal to the resumed run's training.json (itself equal to an uninterrupted run's), in the same MLflow run."""
    cfg = config(steps=8, eval_every=5, checkpoint_every=2, report_to="tensorboard,mlflow")
    reference = run(llama, None, config(steps=8, eval_every=5, checkpoint_every=2)).record

    out = tmp_path / "run"

    def interrupt(step: int, metric: float) -> bool:
        raise Interrupted(step)

    with pytest.raises(Interrupted):
        run(llama, out, cfg, on_eval=interrupt)
    assert only_logs(out) and not (out / "adapter.json").exists()
    saved = torch.load(checkpoint_path(out), weights_only=False)["state"]
    assert saved["step"] == 4
    client, runs = mlflow_runs(out)
    assert [r.info.status for r in runs] == ["FAILED"] and saved["tracker_runs"]["mlflow"] == runs[0].info.run_id
    assert [s for s, _ in history(client, runs[0].info.run_id, "train/loss")] == [1, 2, 3, 4, 5]

    record = run(llama, out, cfg, resume=True).record
    assert losses(record) == losses(reference)
    assert same_curve(tensorboard(out / "tensorboard", "train/loss"), losses(record))
    assert same_curve(tensorboard(out / "tensorboard", "dev/accuracy"), dev_points(record))
    client, again = mlflow_runs(out)
    assert [r.info.run_id for r in again] == [runs[0].info.run_id] and again[0].info.status == "FINISHED"
    assert same_curve(history(client, runs[0].info.run_id, "train/loss"), losses(record))


def test_a_run_stopped_before_its_first_checkpoint_starts_again_cleanly(llama, tmp_path):
    """Its output directory holds only logs: a new run may use it, and its curve replaces the old one."""
    out = tmp_path / "run"

    def interrupt(step: int, metric: float) -> bool:
        raise Interrupted(step)

    with pytest.raises(Interrupted):
        run(llama, out, config(report_to="tensorboard"), on_eval=interrupt)
    assert only_logs(out) and not checkpoint_path(out).exists()
    record = run(llama, out, config(report_to="tensorboard")).record
    assert same_curve(tensorboard(out / "tensorboard", "train/loss"), losses(record))


def test_logs_set_aside_for_a_save_that_fails_go_back(tmp_path):
    """``keep_logs``: when the adapter's save raises, the run's logs are back in the output directory (not left in
    a hidden ``.OUT.logs-*`` directory beside it), and the error is the save's."""
    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events").write_text("curve")

    def failing_save() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        keep_logs(out, failing_save)
    assert (out / "tensorboard" / "events").read_text() == "curve"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_trackers_opened_before_one_that_fails_are_finished(monkeypatch, tmp_path):
    """``--report-to tensorboard,wandb`` where W&B cannot start: TensorBoard's writer is closed and its run marked
    failed, not left open (the loop never gets the trackers to finish them)."""
    from softprompts.training import trackers

    finished = []

    class Opened:
        run_id = "a"

        def __init__(self, place) -> None: ...

        def finish(self, final) -> None:
            finished.append(final)

    class Broken:
        def __init__(self, place) -> None:
            raise RuntimeError("cannot start")

    monkeypatch.setitem(trackers.TRACKERS, "tensorboard", trackers.Backend("json", "-", Opened))
    monkeypatch.setitem(trackers.TRACKERS, "wandb", trackers.Backend("json", "-", Broken))
    with pytest.raises(RuntimeError, match="cannot start"):
        Trackers.open(TrainConfig(report_to="tensorboard,wandb"), RunPlace(tmp_path, "run"), None, None, True)
    assert finished == [None]


@pytest.mark.parametrize("name", ["wandb", "trackio", "tensorboard", "mlflow"])
def test_a_missing_tracker_names_its_extra_before_training(name, monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == name else real(module, *a))
    with pytest.raises(SoftpromptsError, match=rf"pip install 'softprompts\[{name}\]'"):
        TrainConfig(report_to=f"none,{name}").validate()
    with pytest.raises(SoftpromptsError, match="unknown tracker 'tensorbord'.*tensorboard, mlflow, wandb, trackio"):
        TrainConfig(report_to="tensorbord").validate()
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "good", "label": "pos"}) + "\n")
    # refused before the model loads (the model path does not exist) and before anything is written
    code = main(["train", "--model", str(tmp_path / "no-model"), "--data", str(data), "--template", "{text}",
                 "--target", " {label}", "--out", str(tmp_path / "out"), "--report-to", name])
    err = capsys.readouterr().err
    assert code == 2 and f"--report-to {name} needs" in err and f"pip install 'softprompts[{name}]'" in err
    assert "no-model" not in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_only_the_main_rank_reports(tmp_path):
    place = RunPlace(directory=tmp_path / "logs", name="run")
    cfg = TrainConfig(report_to="tensorboard,mlflow")
    assert Trackers.open(cfg, place, None, {}, is_main=False).trackers == {}
    assert not (tmp_path / "logs").exists()
    assert Trackers.open(TrainConfig(), None, None, {}, is_main=True).trackers == {}


def test_compare_reports_one_run_per_method_grouped_under_the_comparison(llama, tmp_path):
    from softprompts.compare import CompareConfig, CompareData, Comparison

    out = tmp_path / "cmp"
    config = CompareConfig(model="unused", methods=["prompt", "prefix"], steps=2, eval_every=1, virtual_tokens=2,
                           latency_tokens=2, latency_repeats=1, progress=False, report_to="tensorboard,mlflow")
    Comparison(config, CompareData(SPEC, examples(8), examples(4), examples(2)), out, base=llama).run()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("compare-cmp").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["prefix-seed0", "prompt-seed0"]
    for r in runs:
        record = json.loads((out / "runs" / r.info.run_name / "adapter" / "training.json").read_text())
        assert same_curve(history(client, r.info.run_id, "train/loss"), losses(record))
        assert same_curve(tensorboard(out / "tensorboard" / r.info.run_name, "train/loss"), losses(record))


def test_tune_reports_one_run_per_trial(tmp_path):
    from tiny import save_tiny

    model = save_tiny("llama", tmp_path / "llama")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": ("nice " if i % 2 else "poor ") + "y" * (i % 5),
                                        "label": "pos" if i % 2 else "neg"}) + "\n" for i in range(12)))
    out = tmp_path / "study"
    assert main(["tune", "--model", str(model), "--method", "prompt", "--data", str(data), "--eval-data", str(data),
                 "--template", "Review: {text}\\nSentiment:", "--target", " {label}", "--trials", "2", "--steps", "2",
                 "--eval-every", "1", "--pruner", "none", "--out", str(out), "--report-to", "tensorboard"]) == 0
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["trial-0", "trial-1"]
    for number in (0, 1):
        record = json.loads((out / "trials" / f"{number:03d}" / "training.json").read_text())
        assert same_curve(tensorboard(out / "tensorboard" / f"trial-{number}", "train/loss"), losses(record))
