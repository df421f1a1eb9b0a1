"""``compare --tune N``: every compared method, and PEFT LoRA when it runs, searched on dev with the same budget of
``N`` trials before its compared runs, which then use the best configuration; so a tuned prompt method meets a tuned
LoRA, not LoRA's hand-picked rate.

One search implementation (``training/tune.py``): our methods through ``tune`` (lr ``~ logU[default_lr / 10,
default_lr * 10]``, ``num_virtual_tokens`` in ``{P/2, P, 2P}`` or the ``--virtual-tokens`` given, the method's own
``tunable`` knobs); LoRA through ``search`` with ``lora_trainer`` (``run_peft`` with the trial's lr and rank: lr ``~
logU[LORA_LR / 10, LORA_LR * 10]``, ``r`` in ``LORA_RANKS``). Every trial trains like a compared run of seed 0 (the
compare's steps, batch, schedule, evaluation interval, training rows) and is scored on the compare's dev rows; with
evaluations before the last step, successive halving stops weak trials at them (``pruner`` ``none`` otherwise).

Layout: ``OUT/tune/<method>/`` and ``OUT/tune/lora/``, each a ``softprompts tune`` directory (``study.db``,
``trials/``, ``best/``, ``best.json``, ``tune.md``, ``trials.png``). A study's budget counts the whole study, so a
rerun continues an interrupted one and trains nothing for a finished one. The compared runs record the ``Tuned``
configuration they used (``result.json``'s ``tuned``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from softprompts.compare.config import CompareConfig, CompareData
from softprompts.compare.peft_baseline import LORA, LORA_LR, LORA_OPTIONS, PeftSpec, release, run_peft
from softprompts.errors import SoftpromptsError
from softprompts.methods import method_class
from softprompts.metrics import PRIMARY_METRIC
from softprompts.training import TrainConfig
from softprompts.training.guards import NonFiniteError
from softprompts.training.tune import (
    LR_SPAN,
    SearchSpace,
    Study,
    Trainer,
    Trial,
    TrialResult,
    TuneConfig,
    TuneResult,
    TuneTask,
    check_task,
    search,
    setup_of,
    tune,
)

TUNE_DIR = "tune"  # OUT/tune/<method>/: one study per method
LORA_RANKS = (4, 8, 16)  # LoRA's r in a compare --tune (lora_alpha = 2 r)


@dataclass(frozen=True)
class Tuned:
    """The configuration a study chose for ``method``: ``params`` (``lr`` and the searched options) of trial
    ``trial``, its dev ``value`` of ``metric``; ``budget`` trials asked for, ``finished`` (of them ``pruned``) in the
    study at ``study`` (relative to the compare's directory)."""

    method: str
    budget: int
    trial: int
    value: float
    metric: str
    params: dict
    finished: int
    pruned: int
    study: str

    @property
    def lr(self) -> float:
        return float(self.params["lr"])

    @property
    def options(self) -> dict:
        """The searched config options (method fields, or LoRA's ``r``), without the learning rate."""
        return {k: v for k, v in self.params.items() if k != "lr"}

    @classmethod
    def of(cls, method: str, budget: int, result: TuneResult, study: str) -> Tuned:
        return cls(method, budget, result.trial, result.value, result.metric, dict(result.params), result.finished,
                   result.pruned, study)

    def to_json(self) -> dict:
        return asdict(self)


def tune_config(config: CompareConfig, steps: int) -> TuneConfig:
    """The search settings of ``config.tune`` trials of ``steps`` steps: ``--virtual-tokens`` (when given) as the only
    choice of P, successive halving when the evaluations leave a step to stop at."""
    virtual = None if config.virtual_tokens is None else (config.virtual_tokens,)
    pruner = "halving" if 0 < config.eval_every < steps else "none"
    return TuneConfig(trials=config.tune, virtual_tokens=virtual, pruner=pruner, seed=0)


def space_of(config: CompareConfig, method: str) -> SearchSpace:
    """What a compare searches for ``method`` (module docstring)."""
    if method == LORA:
        return SearchSpace(lr=(LORA_LR / LR_SPAN, LORA_LR * LR_SPAN), choices={"r": LORA_RANKS},
                           start={"lr": LORA_LR, "r": LORA_OPTIONS["r"]})
    return SearchSpace.for_method(method, tune_config(config, config.steps or 2))


def longest_prompt(config: CompareConfig, method: str) -> int | None:
    """The most virtual tokens ``method``'s runs may have (the context checks' P): the largest choice when tuning,
    else ``--virtual-tokens`` (``None``: the method's default)."""
    if config.tune is None:
        return config.virtual_tokens
    return max(space_of(config, method).choices["num_virtual_tokens"])


def tune_problems(config: CompareConfig, data: CompareData) -> list[str]:
    """``--tune``'s refusals without the model: Optuna installed, dev rows to choose on (after the carve), and every
    combination of each method's choices a valid method config."""
    if config.tune is None or config.errors():
        return []
    try:
        import optuna  # noqa: F401
    except ImportError:
        return ["--tune needs Optuna: pip install 'softprompts[tune]'"]
    if not data.dev:
        return ["--tune N chooses each method's configuration on dev rows: give --eval-data (compare carves dev rows "
                "from 10 or more training rows when none are given)"]
    found = []
    for name in dict.fromkeys(config.methods):
        try:
            cls = method_class(name)
            check_task(TuneTask(None, cls.name, data.spec, data.train, data.dev), space_of(config, cls.name),
                       check_context=False)
        except SoftpromptsError as exc:
            found.append(f"--tune {name}: {exc}")
    return found


@dataclass
class Tuning:
    """The studies of one compare: ``best(method, train_config)`` searches ``method`` (or ``LORA``) with trials
    trained like ``train_config`` (seed 0's run of it) and returns the ``Tuned`` configuration (module docstring)."""

    base: object
    data: CompareData
    dev: list
    config: CompareConfig
    out: Path
    base_dev: dict | None = None

    @property
    def metric(self) -> str:
        return PRIMARY_METRIC[self.data.spec.task]

    def best(self, method: str, train_config: TrainConfig) -> Tuned:
        out_dir = self.out / TUNE_DIR / method
        search_config = tune_config(self.config, train_config.steps)
        task = TuneTask(self.base, method, self.data.spec, self.data.train, self.dev, base_dev=self.base_dev)
        if method == LORA:
            space = space_of(self.config, LORA)
            study = Study(out_dir, space, self.metric, LORA, setup_of(LORA, task, space, train_config))
            result = search(study, lora_trainer(self.base, self.data, self.dev), train_config, search_config)
        else:
            result = tune(task, train_config, search_config, out_dir)
        return Tuned.of(method, self.config.tune, result, str(out_dir.relative_to(self.out)))


def lora_trainer(base, data: CompareData, dev: list) -> Trainer:
    """One LoRA trial: ``run_peft`` with the trial's lr and rank ``r`` on the compare's training rows, kept on
    ``dev`` (PEFT's adapter of the kept state saved to the trial's directory), stopped when the pruner says so; the
    base model unwrapped again after it. A loss that is not finite: ``NonFiniteError`` (the trial is pruned)."""
    primary = PRIMARY_METRIC[data.spec.task]

    def run(trial: Trial) -> TrialResult:
        spec = PeftSpec(LORA, None, trial.config, hidden_size=base.shapes.hidden_size, lora_rank=trial.options["r"])
        result = run_peft(base, spec, replace(data, dev=dev, test=[]), out_dir=trial.out_dir, on_eval=trial.on_eval)
        release(result, base)
        if not all(math.isfinite(point["loss"]) for point in result.curve[1:]):
            raise NonFiniteError(f"training stopped: the loss is not finite at lr {trial.lr:g}")
        return TrialResult(value=float(result.best_dev[primary]), steps_done=result.steps_done,
                           best_step=result.best_step, stopped_early=result.stopped_early,
                           trainable_parameters=result.trainable_params)

    return run


__all__ = ["LORA_RANKS", "TUNE_DIR", "Tuned", "Tuning", "longest_prompt", "lora_trainer", "space_of", "tune_config",
           "tune_problems"]
