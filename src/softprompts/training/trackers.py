"""Experiment trackers: the training curve written live where users already watch training (``--report-to``).

One interface, ``Tracker``, and one implementation per tracker; each tracker's own library does the writing:

    tensorboard  torch.utils.tensorboard.SummaryWriter  D/tensorboard/ (D/tensorboard/NAME/ when D is shared)
    mlflow       mlflow's MlflowClient, SQLite store     D/mlflow.db, experiment GROUP, run NAME
    wandb        wandb.init(dir=D)                       offline (D/wandb/) unless logged in (WANDB_API_KEY or
                                                         `wandb login`) or WANDB_MODE says otherwise
    trackio      trackio.init(project=GROUP, name=NAME)  D/trackio/ unless TRACKIO_DIR is set

``D`` is the run's output directory (``train``), or a directory several runs share (``TrainConfig.report_dir``:
``compare`` and ``tune`` pass theirs, one run per method or trial, grouped by ``run_group``). What is logged::

    start(config, params)  config: the run's configuration, flattened ("train.lr", "method.init", ...);
                           params: the adapter's sizes (trainable parameters, saved parameters P*d or
                           sum_l 2*H_l*P*D_l, virtual tokens) and the data's
    log(step, metrics)     every optimizer step: train/loss, train/lr, train/grad_norm (before clipping),
                           train/tokens_per_second; every dev evaluation: dev/<metric> (all of dev_score's metrics)
    finish(final)          final/best_dev, final/best_step, final/steps_done, ...; None: the run stopped on an error
                           (flushed and marked failed; a resume continues it)

A resumed run continues the same tracker run: TensorBoard the same log directory with ``purge_step`` = the
checkpoint's step + 1 (its reader drops the steps logged after the checkpoint, which the resumed run logs again);
MLflow, W&B and trackio the run id kept in the checkpoint (``TrainState.tracker_runs``), MLflow skipping the steps
it holds already (a resume is bitwise: they are the same values). Under torchrun only rank 0 reports.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import netrc
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from softprompts.errors import SoftpromptsError

NONE = "none"
DEFAULT_GROUP = "softprompts"
# what trackers write inside an output directory: such a directory is this run's logs, not a finished output
LOG_ENTRIES = ("tensorboard", "mlflow.db", "mlartifacts", "wandb", "trackio")


class Tracker(Protocol):
    """One tracker's run. ``run_id``: what a resume reopens (kept in the checkpoint)."""

    run_id: str | None

    def start(self, config: dict, params: dict) -> None: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self, final: dict[str, float] | None) -> None: ...


@dataclass(frozen=True)
class RunPlace:
    """Where and as what a run reports. directory: the offline stores (``D`` above); name: the run's name; group:
    the experiment / project that groups runs (a compare, a study); shared: several runs write into ``directory``;
    resume_step: the checkpoint's step when resuming (None: a fresh run); run_ids: the resumed run's ids by tracker."""

    directory: Path
    name: str
    group: str = DEFAULT_GROUP
    shared: bool = False
    resume_step: int | None = None
    run_ids: dict = field(default_factory=dict)


# --- the trackers ---------------------------------------------------------------------------------------------------


class TensorBoardTracker:
    """Scalars through torch's ``SummaryWriter`` (the ``tensorboard`` package); the configuration as text."""

    def __init__(self, place: RunPlace) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = place.directory / "tensorboard" / (place.name if place.shared else "")
        if place.resume_step is None:
            shutil.rmtree(log_dir, ignore_errors=True)  # a fresh run: no older curve under its name
        purge = None if place.resume_step is None else place.resume_step + 1
        self.writer = SummaryWriter(str(log_dir), purge_step=purge, flush_secs=10)
        self.run_id, self.resumed, self.step = str(log_dir), place.resume_step is not None, place.resume_step or 0

    def start(self, config: dict, params: dict) -> None:
        if not self.resumed:
            self.writer.add_text("config", _markdown(config))
            self.writer.add_text("params", _markdown(params))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.step = max(self.step, step)

    def finish(self, final: dict[str, float] | None) -> None:
        for key, value in (final or {}).items():
            self.writer.add_scalar(f"final/{key}", value, self.step)
        self.writer.close()


class MlflowTracker:
    """An MLflow run in a local SQLite store (``D/mlflow.db``; ``mlflow ui --backend-store-uri sqlite:///...``)."""

    def __init__(self, place: RunPlace) -> None:
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # the store's creation logs its migrations at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        place.directory.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{(place.directory / 'mlflow.db').resolve()}")
        self.run_id, self.logged = place.run_ids.get("mlflow"), -1
        if self.run_id is not None:  # resumed: the same run, the steps it holds already are not logged twice
            self.client.update_run(self.run_id, status="RUNNING")
            keys = self.client.get_run(self.run_id).data.metrics
            self.logged = max((m.step for k in keys for m in self.client.get_metric_history(self.run_id, k)),
                              default=-1)
            return
        experiment = self.client.get_experiment_by_name(place.group)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            place.group, artifact_location=(place.directory / "mlartifacts").resolve().as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=place.name).info.run_id

    def start(self, config: dict, params: dict) -> None:
        from mlflow.entities import Param

        if self.logged < 0:  # params are written once (MLflow refuses to change one)
            items = {**config, **params}
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in items.items()])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step > self.logged:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finish(self, final: dict[str, float] | None) -> None:
        from mlflow.entities import Metric

        if final:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(f"final/{k}", float(v), now, 0)
                                                        for k, v in final.items()])
        self.client.set_terminated(self.run_id, "FINISHED" if final is not None else "FAILED")


class WandbTracker:
    """A Weights & Biases run, offline (``D/wandb/``, ``wandb sync`` uploads it later) unless the user logged in."""

    def __init__(self, place: RunPlace) -> None:
        import wandb

        place.directory.mkdir(parents=True, exist_ok=True)
        run_id = place.run_ids.get("wandb")
        self.run = wandb.init(project=place.group, name=place.name, dir=str(place.directory), mode=_wandb_mode(),
                              id=run_id, resume="allow" if run_id else None)
        self.run_id = self.run.id

    def start(self, config: dict, params: dict) -> None:
        self.run.config.update({**config, **params}, allow_val_change=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)  # W&B drops a step below its own (the steps a resume runs again)

    def finish(self, final: dict[str, float] | None) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in (final or {}).items()})
        self.run.finish(exit_code=0 if final is not None else 1)


class TrackioTracker:
    """A trackio run (project = the group), stored locally under ``D/trackio/`` unless ``TRACKIO_DIR`` is set."""

    def __init__(self, place: RunPlace) -> None:
        os.environ.setdefault("TRACKIO_DIR", str((place.directory / "trackio").resolve()))
        import trackio

        self.trackio = trackio
        self.place, self.run_id = place, place.run_ids.get("trackio") or place.name

    def start(self, config: dict, params: dict) -> None:
        resume = "allow" if self.place.resume_step is not None else "never"
        self.trackio.init(project=self.place.group, name=self.run_id, config={**config, **params}, resume=resume)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.trackio.log(metrics, step=step)

    def finish(self, final: dict[str, float] | None) -> None:
        if final:
            self.trackio.log({f"final/{k}": v for k, v in final.items()})
        self.trackio.finish()


@dataclass(frozen=True)
class Backend:
    """A tracker: the module that must be installed, the extra that installs it, its implementation."""

    module: str
    extra: str
    make: type


TRACKERS = {
    "tensorboard": Backend("tensorboard", "tensorboard", TensorBoardTracker),
    "mlflow": Backend("mlflow", "mlflow", MlflowTracker),
    "wandb": Backend("wandb", "wandb", WandbTracker),
    "trackio": Backend("trackio", "trackio", TrackioTracker),
}


# --- choosing and checking ------------------------------------------------------------------------------------------


def parse_report_to(text: str) -> tuple[str, ...]:
    """``"tensorboard,mlflow"`` -> ``("tensorboard", "mlflow")``; ``"none"`` (or empty) -> ``()``."""
    names = [name.strip().lower() for name in (text or "").split(",")]
    return tuple(dict.fromkeys(name for name in names if name and name != NONE))


def report_problems(text: str) -> list[str]:
    """Every problem with ``--report-to TEXT``: unknown trackers, and each one whose library is not installed (with the
    extra that installs it), found before training."""
    if not isinstance(text, str):
        return [f"--report-to must be a comma-separated string of trackers, got {text!r}"]
    names = parse_report_to(text)
    choices = ", ".join((NONE, *TRACKERS))
    problems = [f"--report-to: unknown tracker {name!r}; choose from {choices} (comma-separated)"
                for name in names if name not in TRACKERS]
    for name in names:
        backend = TRACKERS.get(name)
        if backend is not None and importlib.util.find_spec(backend.module) is None:
            problems.append(f"--report-to {name} needs the {backend.module} package, which is not installed: "
                            f"pip install 'softprompts[{backend.extra}]'")
    return problems


def only_logs(directory: Path | None) -> bool:
    """``directory`` holds nothing but trackers' logs (an interrupted run's): not a finished output to protect."""
    if directory is None or not directory.is_dir():
        return False
    entries = [entry.name for entry in directory.iterdir()]
    return bool(entries) and all(name in LOG_ENTRIES for name in entries)


def run_place(config, out_dir: Path | None) -> RunPlace | None:
    """Where ``config``'s trackers write (None: no trackers). ``report_dir`` is shared by several runs; otherwise the
    output directory holds them. Refused (before training) when there is neither."""
    if not parse_report_to(config.report_to):
        return None
    if config.report_dir is None and out_dir is None:
        raise SoftpromptsError("--report-to writes its logs under the output directory: give out_dir, or "
                               "TrainConfig.report_dir")
    directory = Path(config.report_dir) if config.report_dir is not None else out_dir
    name = config.run_name or (out_dir.name if out_dir is not None else "run")
    return RunPlace(directory=directory, name=name, group=config.run_group or DEFAULT_GROUP,
                    shared=config.report_dir is not None)


# --- the trackers of one run ----------------------------------------------------------------------------------------


class Trackers:
    """The run's trackers as one (the loop's only view of them); no trackers: every call does nothing."""

    def __init__(self, trackers: dict[str, Tracker] | None = None) -> None:
        self.trackers = dict(trackers or {})

    @classmethod
    def open(cls, config, place: RunPlace | None, resume_step: int | None, run_ids: dict | None,
             is_main: bool) -> Trackers:
        """The trackers of ``config.report_to`` on the main rank (every other rank: none), resumed when
        ``resume_step`` is given; when one fails to open, those opened before it are finished (marked failed)."""
        if place is None or not is_main:
            return cls()
        place = replace(place, resume_step=resume_step, run_ids=dict(run_ids or {}))
        opened = cls()
        try:
            for name in parse_report_to(config.report_to):
                opened.trackers[name] = TRACKERS[name].make(place)
        except BaseException:
            opened.finish(None)
            raise
        return opened

    @property
    def run_ids(self) -> dict[str, str]:
        return {name: tracker.run_id for name, tracker in self.trackers.items() if tracker.run_id is not None}

    def start(self, config: dict, params: dict) -> None:
        config = flatten(config)
        for tracker in self.trackers.values():
            tracker.start(config, params)

    def log(self, step: int, metrics: dict) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for tracker in self.trackers.values():
            tracker.log(step, numbers)

    def finish(self, final: dict | None) -> None:
        """Final metrics (None: stopped on an error) and close; once."""
        trackers, self.trackers = self.trackers, {}
        numbers = None if final is None else {k: float(v) for k, v in final.items() if isinstance(v, int | float)}
        for tracker in trackers.values():
            tracker.finish(numbers)


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 0.03}}`` -> ``{"train.lr": 0.03}`` (lists as JSON)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list | tuple) else value
    return flat


def keep_logs(out_dir: Path, save) -> None:
    """``save()`` replaces ``out_dir`` atomically with the adapter; the trackers' logs in it are set aside, then put
    back into the new version, or into the old one when ``save`` fails (a crash in between leaves them in
    ``.OUT.logs-*`` beside it)."""
    entries = [out_dir / name for name in LOG_ENTRIES if (out_dir / name).exists()]
    if not entries:
        save()
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.logs-", dir=out_dir.parent))
    for entry in entries:
        os.replace(entry, aside / entry.name)
    try:
        save()
    finally:
        out_dir.mkdir(parents=True, exist_ok=True)
        for entry in entries:
            os.replace(aside / entry.name, entry)
        aside.rmdir()


def _markdown(items: dict) -> str:
    return "\n".join(["| key | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in items.items())])


def _wandb_mode() -> str:
    """``WANDB_MODE`` when set; otherwise online only for a user who logged in (``WANDB_API_KEY`` or
    ``wandb login``'s netrc entry), else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


__all__ = ["LOG_ENTRIES", "TRACKERS", "RunPlace", "Tracker", "Trackers", "keep_logs", "only_logs",
           "parse_report_to", "report_problems", "run_place"]
