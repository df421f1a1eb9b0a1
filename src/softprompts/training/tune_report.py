"""What a ``tune`` leaves behind besides its study: the best trial's adapter (``best/``), ``best.json``, a table of
trials (``tune.md``), a plot (``trials.png``), and the one progress line per finished trial.

The plot: left, each trial's dev metric against its number (COMPLETE: the kept adapter's; PRUNED: the best reported
before it stopped, marked x) with the best so far as a step line; right, the metric against the learning rate (log
axis), one colour per value of the first searched choice (``num_virtual_tokens`` for our methods, ``r`` for LoRA).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from softprompts.errors import SoftpromptsError
from softprompts.files import atomic_directory, atomic_json, atomic_text
from softprompts.metrics import binomial_difference_se

REAL_GAIN_SE = 2.0  # a trial replaces the defaults only when it beats them by this many standard errors on dev


@dataclass(frozen=True)
class TuneResult:
    """The chosen COMPLETE trial (the best, or the defaults when no trial beats them beyond noise): its number, dev
    ``value`` of ``metric``, parameters (``lr`` and config options) and adapter directory (``out_dir/best``); how many
    trials finished and how many of them were pruned."""

    trial: int
    value: float
    metric: str
    params: dict
    best_dir: Path
    finished: int
    pruned: int
    defaults_kept: str | None = None  # why the defaults stayed the choice (a lead within noise), else None


def trial_dir(out_dir: Path, number: int) -> Path:
    """Where trial ``number`` trains: ``out_dir/trials/NNN`` (its log: ``NNN.log`` beside it)."""
    return out_dir / "trials" / f"{number:03d}"


def _value(trial) -> float | None:
    """A trial's dev metric: its value, or (pruned) the last best it reported."""
    if trial.last_step is not None and trial.value is None:
        return trial.intermediate_values[trial.last_step]
    return trial.value


def _complete(trial) -> bool:
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE


def space_text(space: dict) -> str:
    """``lr 0.0003..0.03, num_virtual_tokens 10/20/40, ...``"""
    return ", ".join(f"{name} {values[0]:.3g}..{values[1]:.3g}" if name == "lr" else
                     f"{name} {'/'.join(map(str, values))}" for name, values in space.items())


def _params(params: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def trial_line(study, trial, metric: str, budget: int | None, steps: int) -> str:
    """``trial 3 (4 of 8): lr 0.012, num_virtual_tokens 20 -> dev accuracy 0.7500, pruned at step 25 of 100 | best
    0.8000 (trial 1) | 4.1 s``"""
    from optuna.trial import TrialState

    finished = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    value = _value(trial)
    outcome = {TrialState.COMPLETE: "", TrialState.PRUNED:
               f", pruned at step {trial.user_attrs.get('steps_done', trial.last_step)} of {steps}"}.get(
        trial.state, f", {trial.state.name.lower()}")
    stopped = f" ({trial.user_attrs['stopped']})" if "stopped" in trial.user_attrs else ""
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value, default=None)
    best_text = f"best {best.value:.4f} (trial {best.number})" if best else "no trial complete yet"
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else 0.0
    shown = "-" if value is None else f"{value:.4f}"
    count = f"{len(finished)} of {budget}" if budget else f"{len(finished)} finished"
    return (f"trial {trial.number} ({count}): {_params(trial.params)} -> dev {metric} "
            f"{shown}{outcome}{stopped} | {best_text} | {seconds:.1f} s")


def defaults_kept(top, defaults, metric: str, dev_n: int | None) -> str | None:
    """Why the defaults' trial stays the choice over ``top`` (the highest dev score), or ``None`` when ``top`` wins.

    With one seed and an accuracy on ``n`` dev rows, ``top`` must beat the defaults by ``REAL_GAIN_SE`` standard
    errors of the difference (``metrics.binomial_difference_se``): measured on Gemma-3-270M bbc-topics with 100 dev
    rows, the configurations six trials chose by a 1-2 point dev lead scored 4-10 points below the defaults on test
    (docs/RESULTS.md). Other metrics have no noise model here: the highest dev score wins."""
    if defaults is None or top is defaults or metric != "accuracy" or not dev_n:
        return None
    se = binomial_difference_se(top.value, defaults.value, dev_n)
    if top.value - defaults.value >= REAL_GAIN_SE * se:
        return None
    return (f"trial {top.number} leads the defaults (trial {defaults.number}) by "
            f"{100 * (top.value - defaults.value):.1f} points of dev {metric}, under {REAL_GAIN_SE:g} standard errors "
            f"({100 * se:.1f} each, binomial, {dev_n} dev rows): within noise, so the defaults are kept")


def write_outputs(study, out_dir: Path, metric: str, space: dict, dev_n: int | None = None) -> TuneResult:
    """``tune.md`` and ``trials.png`` over every trial, then ``best/`` (a copy of the chosen trial's adapter
    directory, an ordinary adapter) and ``best.json``; ``SoftpromptsError`` when no trial completed. The choice: the
    highest dev score, unless it is within noise of the defaults' trial (``defaults_kept``)."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.RUNNING]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number), default=None)  # ties: the earlier trial
    defaults = next((t for t in complete if t.user_attrs.get("defaults")), None)
    kept = defaults_kept(best, defaults, metric, dev_n) if best is not None else None
    if kept:
        best = defaults
    atomic_text(out_dir / "tune.md", _table(trials, best, metric, space, kept))
    _plot(trials, out_dir / "trials.png", metric, next((name for name in space if name != "lr"), None))
    if best is None:
        raise SoftpromptsError(f"no trial completed (see {out_dir}/tune.md); give a larger budget, or a --lr-range "
                               "where training does not diverge")
    source = trial_dir(out_dir, best.number)
    atomic_directory(out_dir / "best", lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True), overwrite=True)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    result = TuneResult(trial=best.number, value=best.value, metric=metric, params=dict(best.params),
                        best_dir=out_dir / "best", finished=len(finished),
                        pruned=sum(t.state == TrialState.PRUNED for t in finished), defaults_kept=kept)
    atomic_json(out_dir / "best.json", {
        "trial": best.number, "metric": f"dev_{metric}", "value": best.value, "params": best.params,
        "adapter": "best", "source": str(source.relative_to(out_dir)), "finished_trials": result.finished,
        "pruned_trials": result.pruned, "search_space": space, "defaults_kept": kept})
    return result


def _table(trials: list, best, metric: str, space: dict, kept: str | None = None) -> str:
    """``tune.md``: the chosen configuration (and why the defaults stayed, ``kept``), then one row per trial (its
    parameters, state, metric, steps, time)."""
    names = list(space)
    lines = ["# Tuning", ""]
    if best is not None:
        lines += [f"Best: trial {best.number}, dev {metric} {best.value:.4f} with {_params(best.params)} "
                  "(adapter: `best/`).", ""]
    if kept:
        lines += [f"The defaults are kept: {kept}.", ""]
    lines += [f"Search space: {space_text(space)}.", "",
              "| trial | " + " | ".join(names) + f" | state | dev {metric} | steps | seconds |",
              "|---:|" + "---:|" * len(names) + "---|---:|---:|---:|"]
    for t in trials:
        value = _value(t)
        cells = [f"{t.params[n]:.3g}" if isinstance(t.params.get(n), float) else str(t.params.get(n, "-"))
                 for n in names]
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else 0.0
        mark = " **best**" if best is not None and t.number == best.number else ""
        lines.append(f"| {t.number} | " + " | ".join(cells) + f" | {t.state.name.lower()}{mark} | "
                     f"{'-' if value is None else f'{value:.4f}'} | {t.user_attrs.get('steps_done', '-')} | "
                     f"{seconds:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(trials: list, path: Path, metric: str, colour_by: str | None) -> None:
    """``trials.png`` (see the module docstring); ``colour_by``: the choice whose values get a colour each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(t, _value(t)) for t in trials if _value(t) is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    running, steps = -float("inf"), []
    for t, value in shown:
        left.scatter([t.number], [value], marker="o" if _complete(t) else "x",
                     color="tab:blue" if _complete(t) else "tab:gray")
        if _complete(t):
            running = max(running, value)
            steps.append((t.number, running))
    if steps:
        left.step(*zip(*steps, strict=True), where="post", color="tab:orange", label="best so far")
        left.legend()
    left.set(xlabel="trial (x: pruned)", ylabel=f"dev {metric}", title="trials")
    for value in sorted({t.params.get(colour_by) for t, _ in shown}, key=str):
        points = [(t.params["lr"], v) for t, v in shown if t.params.get(colour_by) == value and "lr" in t.params]
        if points:
            label = ("trials" if colour_by is None else f"{value} virtual tokens"
                     if colour_by == "num_virtual_tokens" else f"{colour_by} {value}")
            right.scatter(*zip(*points, strict=True), label=label)
    right.set(xscale="log", xlabel="learning rate", ylabel=f"dev {metric}", title="metric against lr")
    if shown:
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["TuneResult", "space_text", "trial_dir", "trial_line", "write_outputs"]
