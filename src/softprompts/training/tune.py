"""Search a method's learning rate, virtual tokens and own knobs on dev, within a budget: ``tune`` (Optuna).

Search space (``SearchSpace.for_method``): ``lr ~ logU[lo, hi]`` (default ``[default_lr / 10, default_lr * 10]``,
the method's measured rate in the middle) and, for each config field the method declares
(``MethodConfig.search_choices``: ``num_virtual_tokens`` in ``{P/2, P, 2P}``, then its own ``tunable`` knobs), a
categorical choice. The first trial of a new study is the defaults (``SearchSpace.start``): a search never ends
below them on dev. Sampler: TPE (``n_startup`` random trials first).

Objective: the kept adapter's dev metric, ``max_s m(s)`` over the loop's evaluations (its keep-best). Pruning: after
the evaluation at step ``s`` the trial reports ``max_{s' <= s} m(s')`` at ``s`` (``loop.train``'s ``on_eval``);
successive halving with minimum resource ``r = eval_every`` and reduction ``eta = 3`` lets a trial pass rung ``k``
(step ``r * eta^k``) only when it is in the top ``1/eta`` of the trials that reached that rung (the first ones: when
it is the best so far), else training stops there and the trial is PRUNED (``--pruner hyperband``: Hyperband's
brackets of successive halving over ``[eval_every, steps]``; ``none``: every trial runs to the end).

Budget: ``trials`` finished trials (COMPLETE + PRUNED) in the study, and/or ``minutes`` of trial time summed over the
study (no new trial starts after it; a running one finishes). A killed run leaves its trial RUNNING: the next run
(the same ``out_dir``; one at a time, ``out_dir/.tune.lock``) marks it FAIL, deletes its files and tries its
parameters again first. Layout of ``out_dir``: ``study.db`` (SQLite, ``optuna-dashboard out_dir/study.db`` opens
it), ``trials/NNN/`` (each trial's adapter and ``training.json``) and ``trials/NNN.log`` (its training log), then
``tune_report.write_outputs``: ``best/``, ``best.json``, ``tune.md``, ``trials.png``.

One study driver, two callers: ``search(study, trainer, ...)`` runs the study and calls ``trainer(Trial) ->
TrialResult`` to train one trial (lr, the searched options, where to save, the pruning hook); ``tune`` is ``search``
with ``method_trainer`` (our loop, one method), and ``compare --tune`` calls ``search`` for PEFT LoRA with a trainer of
its own (``compare/tuning.py``), so both search the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from softprompts.errors import SoftpromptsError
from softprompts.methods import build_method, method_class
from softprompts.metrics import PRIMARY_METRIC
from softprompts.tasks import TaskSpec
from softprompts.training.config import REPORTING, TrainConfig
from softprompts.training.distributed import Distributed
from softprompts.training.guards import NonFiniteError
from softprompts.training.loop import EvalCallback, train
from softprompts.training.preflight import log
from softprompts.training.tune_report import TuneResult, space_text, trial_dir, trial_line, write_outputs

PRUNERS = ("halving", "hyperband", "none")
STUDY_FILE = "study.db"
STUDY_NAME = "softprompts-tune"
LR_SPAN = 10.0  # the default lr range: default_lr / LR_SPAN .. default_lr * LR_SPAN


@dataclass(frozen=True)
class TuneConfig:
    """trials: finished trials the study should hold; minutes: trial time the study may spend (either or both);
    lr_range: ``(lo, hi)`` of the log-uniform learning rate (``None``: the method's ``default_lr`` / 10 .. x 10);
    virtual_tokens: the ``num_virtual_tokens`` choices (``None``: the method's); pruner: one of ``PRUNERS``;
    seed: the sampler's."""

    trials: int | None = None
    minutes: float | None = None
    lr_range: tuple[float, float] | None = None
    virtual_tokens: tuple[int, ...] | None = None
    pruner: str = "halving"
    seed: int = 0

    def errors(self, train_config: TrainConfig | None = None) -> list[str]:
        """Every problem at once; with ``train_config``, also whether its evaluations leave anything to prune at."""
        problems = []
        if self.trials is None and self.minutes is None:
            problems.append("give a budget: --trials N (finished trials) and/or --minutes M (trial time)")
        if self.trials is not None and (not isinstance(self.trials, int) or self.trials < 1):
            problems.append(f"--trials must be a positive integer, got {self.trials!r}")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            problems.append(f"--minutes must be a positive number, got {self.minutes!r}")
        if self.lr_range is not None:
            lo, hi = self.lr_range
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
                problems.append(f"--lr-range LO,HI needs 0 < LO < HI (finite), got {lo:g},{hi:g}")
        if self.virtual_tokens is not None and (
                not self.virtual_tokens or any(not isinstance(p, int) or p < 1 for p in self.virtual_tokens)):
            problems.append(f"--virtual-tokens-choices must be positive integers, got {self.virtual_tokens!r}")
        if self.pruner not in PRUNERS:
            problems.append(f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if train_config is not None and self.pruner != "none" and not 0 < train_config.eval_every < train_config.steps:
            problems.append(f"--eval-every {train_config.eval_every} with --steps {train_config.steps} evaluates "
                            "only at the end: no trial can be stopped early; give --eval-every below --steps, or "
                            "--pruner none")
        return problems

    def validate(self, train_config: TrainConfig | None = None) -> TuneConfig:
        problems = self.errors(train_config) + (train_config.errors() if train_config is not None else [])
        if problems:
            raise SoftpromptsError("; ".join(problems))
        return self


@dataclass(frozen=True)
class SearchSpace:
    """``lr``: the log-uniform range; ``choices``: config field -> the values tried (categorical); ``start``: the
    defaults' values, the first trial of a new study, so a search never ends below the defaults on dev (those that
    fall outside the space are left to the sampler)."""

    lr: tuple[float, float]
    choices: dict[str, tuple] = field(default_factory=dict)
    start: dict = field(default_factory=dict, compare=False)

    @classmethod
    def for_method(cls, name: str, config: TuneConfig) -> SearchSpace:
        """The method's space (its ``default_lr``, its config's ``search_choices``) with the user's ranges."""
        method = method_class(name)
        choices = dict(method.config_class.search_choices())
        if config.virtual_tokens is not None:
            choices["num_virtual_tokens"] = tuple(sorted(set(config.virtual_tokens)))
        lr = config.lr_range or (method.default_lr / LR_SPAN, method.default_lr * LR_SPAN)
        defaults = {f.name: f.default for f in fields(method.config_class)}
        return cls(lr=(float(lr[0]), float(lr[1])), choices=choices,
                   start={"lr": method.default_lr, **{k: defaults[k] for k in choices if k in defaults}})

    def first_trial(self) -> dict:
        """``start`` less what lies outside the space (a ``--lr-range`` or a choice list without the default)."""
        fits = {k: v for k, v in self.start.items() if k in self.choices and v in self.choices[k]}
        if "lr" in self.start and self.lr[0] <= self.start["lr"] <= self.lr[1]:
            fits["lr"] = self.start["lr"]
        return fits

    def suggest(self, trial) -> tuple[float, dict]:
        """``(lr, config options)`` for an Optuna trial."""
        lr = trial.suggest_float("lr", self.lr[0], self.lr[1], log=True)
        return lr, {name: trial.suggest_categorical(name, list(values)) for name, values in self.choices.items()}

    def to_json(self) -> dict:
        return {"lr": list(self.lr), **{name: list(values) for name, values in self.choices.items()}}


@dataclass
class TuneTask:
    """What every trial trains on: the base (``None`` until it loads), the method's name, the task, its rows, and
    method options every trial shares (``options``, e.g. ``init``; not searched)."""

    base: object
    method: str
    spec: TaskSpec
    train_examples: list
    dev_examples: list
    options: dict = field(default_factory=dict)
    base_dev: dict | None = None  # the bare model's dev metrics when the caller has them (else the first trial's)

    @property
    def metric(self) -> str:
        return PRIMARY_METRIC[self.spec.task]


def check_task(task: TuneTask, space: SearchSpace, check_context: bool = True) -> None:
    """Refusals before any trial trains: dev rows (the search's only signal), every combination of choices as a
    method config (``MethodError`` lists what is wrong), and (``check_context``: the base has loaded) the longest
    prompt choice in the model's context."""
    if not task.dev_examples:
        raise SoftpromptsError("tune chooses on the dev split: give --eval-data with at least one row")
    if not task.train_examples:
        raise SoftpromptsError("the training data is empty")
    names = list(space.choices)
    for values in itertools.product(*space.choices.values()):
        method_class(task.method).config_class.from_options(**task.options, **dict(zip(names, values, strict=True)))
    longest = max(space.choices.get("num_virtual_tokens", (1,)))
    if check_context and longest + 1 > task.base.context_limit:
        raise SoftpromptsError(f"{longest} virtual tokens leave no room for real tokens in the model's context of "
                               f"{task.base.context_limit}; give smaller --virtual-tokens-choices")


# --- the study: opened once per run, under a lock, stale trials retried --------------------------------------------


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """One search per directory at a time (``flock``: released by the kernel when the holder dies, even by
    ``kill -9``), so a RUNNING trial found after taking the lock belongs to a run that is gone."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / ".tune.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SoftpromptsError(f"another search is running on {out_dir} (`softprompts tune` or `compare "
                                   "--tune`); wait for it or choose another --out") from None
        yield


def _open_study(out_dir: Path, setup: dict, config: TuneConfig, train_config: TrainConfig):
    """The study in ``out_dir/study.db`` (created or continued; another setup's study is refused), its stale
    trials failed and queued again."""
    import optuna

    pruner = {"halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=train_config.eval_every),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=train_config.eval_every,
                                                                  max_resource=train_config.steps),
              "none": optuna.pruners.NopPruner}[config.pruner]()
    storage = f"sqlite:///{(out_dir / STUDY_FILE).resolve()}"
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize", pruner=pruner,
                                load_if_exists=True)
    before = study.user_attrs.get("setup")
    if before is not None and before != setup:
        changed = sorted(k for k in set(before) | set(setup) if before.get(k) != setup.get(k))
        raise SoftpromptsError(f"{out_dir} holds a study of other settings ({', '.join(changed)} differ); rerun "
                               "the same command to continue it, or choose another --out")
    study.set_user_attr("setup", setup)
    startup = min(10, max(2, (config.trials or 30) // 3))
    study.sampler = optuna.samplers.TPESampler(seed=config.seed + len(study.trials), n_startup_trials=startup)
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
        _remove_trial_files(out_dir, stale.number)
        study.enqueue_trial(stale.params, user_attrs={"retry_of": stale.number})
    return study


def _remove_trial_files(out_dir: Path, number: int) -> None:
    directory = trial_dir(out_dir, number)
    shutil.rmtree(directory, ignore_errors=True)
    for path in directory.parent.glob(f"{directory.name}.*"):  # its log and checkpoint
        path.unlink(missing_ok=True)


def _finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def _seconds(trials: list) -> float:
    return sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
               if t.datetime_complete is not None and t.datetime_start is not None)


# --- one trial -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """What a trainer gets for one trial: its ``number``, learning rate and searched ``options`` (config field ->
    value), ``config`` (the shared ``TrainConfig`` with this ``lr``, no progress bar, no checkpoints), ``out_dir``
    (``trials/NNN``: save what ``best/`` should hold there), ``on_eval(step, dev metric) -> stop?`` (call it after each
    dev evaluation past step 0; ``True``: stop training now) and ``base_dev`` (the bare model's dev metrics, once a
    trial has returned them)."""

    number: int
    lr: float
    options: dict
    config: TrainConfig
    out_dir: Path
    on_eval: EvalCallback
    base_dev: dict | None = None


@dataclass(frozen=True)
class TrialResult:
    """A trained trial: ``value`` (its kept state's dev metric), steps run, the step kept, whether ``on_eval`` stopped
    it (then it is PRUNED), its trainable parameters and (optional) the bare model's dev metrics it measured. A trainer
    raises ``NonFiniteError`` when training diverged (the trial is PRUNED, the study goes on)."""

    value: float
    steps_done: int
    best_step: int
    stopped_early: bool
    trainable_parameters: int
    base_dev: dict | None = None


Trainer = Callable[[Trial], TrialResult]


def method_trainer(task: TuneTask) -> Trainer:
    """Train ``task.method`` through our loop: the method built with the trial's options (beside ``task.options``),
    trained with the trial's lr on ``task``'s rows, the adapter kept on dev written to ``trial.out_dir``."""

    def run(trial: Trial) -> TrialResult:
        method = build_method(task.base, task.method, task.spec, seed=trial.config.seed, **task.options,
                              **trial.options)
        record = train(task.base, method, task.train_examples, task.spec, trial.config,
                       dev_examples=task.dev_examples, out_dir=trial.out_dir, overwrite=True,
                       base_dev=trial.base_dev or task.base_dev, on_eval=trial.on_eval).record
        return TrialResult(value=float(record["best_dev"]), steps_done=record["steps_done"],
                           best_step=record["best_step"], stopped_early=record["stopped_early"],
                           trainable_parameters=record["trainable_parameters"],
                           base_dev=record["base_model_dev"])

    return run


@dataclass
class _Objective:
    """``objective(trial) -> dev metric``: the trial's lr and options from the space, ``trainer`` into
    ``trials/NNN/`` (its stderr into ``trials/NNN.log``), every evaluation reported for pruning."""

    trainer: Trainer
    space: SearchSpace
    config: TrainConfig
    out_dir: Path
    study: object

    def __call__(self, trial) -> float:
        import optuna

        lr, options = self.space.suggest(trial)
        best = [-math.inf]

        def on_eval(step: int, metric: float) -> bool:
            best[0] = max(best[0], metric)
            trial.report(best[0], step)
            return trial.should_prune()

        out = trial_dir(self.out_dir, trial.number)
        out.parent.mkdir(parents=True, exist_ok=True)
        run = Trial(number=trial.number, lr=lr, options=options, out_dir=out, on_eval=on_eval,
                    config=replace(self.config, lr=lr, progress=False, checkpoint_every=0, report_dir=str(self.out_dir),
                                   run_name=f"trial-{trial.number}", run_group=f"tune-{self.out_dir.name}"),
                    base_dev=self.study.user_attrs.get("base_dev"))
        with out.with_suffix(".log").open("w", buffering=1) as log_file, contextlib.redirect_stderr(log_file):
            try:
                result = self.trainer(run)
            except NonFiniteError as exc:  # this lr diverged: a trial as bad as they come, not a broken study
                trial.set_user_attr("stopped", str(exc).split(";")[0])
                raise optuna.TrialPruned() from None
        if result.base_dev is not None:
            self.study.set_user_attr("base_dev", result.base_dev)
        trial.set_user_attr("steps_done", result.steps_done)
        trial.set_user_attr("best_step", result.best_step)
        trial.set_user_attr("trainable_parameters", result.trainable_parameters)
        if result.stopped_early:
            raise optuna.TrialPruned()
        return result.value


@dataclass(frozen=True)
class Study:
    """One search: where it lives (``out_dir``), what it searches (``space``), the dev ``metric`` it maximizes, a
    ``label`` for its log lines, and ``setup``: everything its trials depend on besides the searched values (a
    rerun with another setup is refused, one with the same continues)."""

    out_dir: Path
    space: SearchSpace
    metric: str
    label: str
    setup: dict


def search(study: Study, trainer: Trainer, train_config: TrainConfig, config: TuneConfig) -> TuneResult:
    """Run ``study`` until ``config``'s budget is spent, ``trainer`` training each trial; write its outputs (module
    docstring) and return the best trial. The budget counts the whole study: a rerun continues it, and one whose
    budget is spent trains nothing."""
    import optuna

    config.validate(train_config)
    out_dir, dist = Path(study.out_dir), Distributed()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with _locked(out_dir):
            stored = _open_study(out_dir, study.setup, config, train_config)
            if not stored.trials and study.space.first_trial():
                stored.enqueue_trial(study.space.first_trial(), user_attrs={"defaults": True})
            done = _finished(stored)
            trials = None if config.trials is None else config.trials - len(done)
            timeout = None if config.minutes is None else config.minutes * 60 - _seconds(done)
            if (trials is None or trials > 0) and (timeout is None or timeout > 0):
                log(dist, f"tune {study.label}: {len(done)} trial(s) done; searching "
                          f"{space_text(study.space.to_json())}")
                objective = _Objective(trainer, study.space, train_config, out_dir, stored)
                stored.optimize(objective, n_trials=trials, timeout=timeout, callbacks=[
                    lambda s, t: log(dist, trial_line(s, t, study.metric, config.trials, train_config.steps))])
            else:
                log(dist, f"tune {study.label}: the budget is spent ({len(done)} trial(s), "
                          f"{_seconds(done) / 60:.1f} min): nothing to run")
            return write_outputs(stored, out_dir, study.metric, study.space.to_json(), dev_rows(study.setup))
    finally:
        optuna.logging.set_verbosity(verbosity)


def tune(task: TuneTask, train_config: TrainConfig, config: TuneConfig, out_dir: str | Path) -> TuneResult:
    """Search ``task.method``'s space on ``task``'s dev rows within ``config``'s budget; writes ``out_dir`` (see the
    module docstring) and returns the best trial. A rerun with the same arguments continues the study."""
    config.validate(train_config)
    space = SearchSpace.for_method(task.method, config)
    check_task(task, space)
    name = method_class(task.method).name
    study = Study(Path(out_dir), space, task.metric, name, setup_of(name, task, space, train_config))
    return search(study, method_trainer(task), train_config, config)


def dev_rows(setup: dict) -> int | None:
    """How many dev rows each trial is scored on: the task's, cut to ``eval_limit``."""
    limit = setup.get("train_config", {}).get("eval_limit")
    rows = setup.get("dev_examples")
    return min(rows, limit) if rows and limit else rows


def setup_of(name: str, task: TuneTask, space: SearchSpace, train_config: TrainConfig) -> dict:
    """A study's ``setup``: what ``name``'s trials depend on besides the searched values (the task, the training
    options but the lr, the rows' counts, the fixed method options)."""
    return {"method": name, "space": space.to_json(), "task": task.spec.to_json(),
            "train_config": {k: v for k, v in asdict(train_config).items()
                             if k not in ("lr", "progress", *REPORTING)},
            "train_examples": len(task.train_examples), "dev_examples": len(task.dev_examples),
            "options": task.options}


__all__ = ["LR_SPAN", "PRUNERS", "STUDY_FILE", "SearchSpace", "Study", "Trainer", "Trial", "TrialResult", "TuneConfig",
           "TuneResult", "TuneTask", "check_task", "method_trainer", "search", "setup_of", "trial_dir",
           "tune"]
