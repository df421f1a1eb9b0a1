"""A search from files, below the command line: ``softprompts tune`` is its flags plus one call (``tune_files``), and
``sp.tune_files`` is the same call. Before any model loads: Optuna is installed, the budgets and ranges are valid
(``TuneConfig.validate``), the output can be a directory (an existing study is continued), dev data is given, and
the data and every choice are valid for the method (``training.tune.check_task``); then ``training.tune.tune``
searches (Optuna TPE, weak trials pruned at the dev evaluations)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from softprompts.errors import SoftpromptsError
from softprompts.files import check_output
from softprompts.methods import method_class
from softprompts.training.config import TrainConfig
from softprompts.training.tune import SearchSpace, TuneConfig, TuneTask, check_task, tune
from softprompts.training.tune_report import TuneResult
from softprompts.workflow.inputs import TaskFlags, lazy_base, load_task
from softprompts.workflow.train import Hardware


@dataclass(frozen=True)
class TuneFiles:
    """A study of ``method`` on the rows of ``data``, chosen on ``eval_data`` (its first ``train.eval_limit`` rows),
    every trial trained with ``train`` (its lr the search's) from ``init``, within ``config``'s budget; written
    under ``out`` (``best/``, ``best.json``, ``tune.md``, ``trials.png``, ``study.db``). ``hardware.device_map`` is
    not used (a trial's base is one device)."""

    out: str | Path
    data: str
    eval_data: str | None = None
    config: TuneConfig = field(default_factory=TuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskFlags = TaskFlags()
    method: str = "prompt"
    init: str | None = None
    model: str | None = None
    hardware: Hardware = Hardware()


def tune_files(request: TuneFiles) -> TuneResult:
    """The best trial of the study ``request`` describes (module docstring); a rerun continues it."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SoftpromptsError("softprompts tune needs Optuna: pip install 'softprompts[tune]'") from None
    name = method_class(request.method).name
    request.config.validate(request.train)
    check_output(request.out, overwrite=True)  # an existing study is continued; a path under a file fails now
    if not request.eval_data:
        raise SoftpromptsError("tune chooses on the dev split: give --eval-data FILE")
    base = lazy_base(request.model, request.hardware.quantize, request.hardware.device, dtype=request.hardware.dtype)
    spec, examples, (dev,) = load_task(request.task, request.data, [request.eval_data], lambda: base().tokenizer)
    limit = request.train.eval_limit
    task = TuneTask(None, name, spec, examples, dev[:limit] if limit else dev,
                    options={"init": request.init} if request.init else {})
    check_task(task, SearchSpace.for_method(name, request.config), check_context=False)  # before the model loads
    task.base = base()
    return tune(task, request.train, request.config, request.out)


def tune_summary(result: TuneResult, out: str | Path) -> str:
    """The one line ``softprompts tune`` prints: the best trial, its dev metric and parameters, the counts."""
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.params.items())
    kept = f" ({result.defaults_kept})" if result.defaults_kept else ""
    return (f"best: trial {result.trial}, dev {result.metric} {result.value:.4f} with {params}{kept}; "
            f"{result.finished} trial(s) finished, {result.pruned} pruned; adapter in {out}/best, table in "
            f"{out}/tune.md")


__all__ = ["TuneFiles", "tune_files", "tune_summary"]
