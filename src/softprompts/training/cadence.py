"""The rules both training loops keep, ours (``loop.py``) and compare's PEFT baseline (``compare/peft_baseline.py``),
so a method and its PEFT counterpart are scheduled, evaluated and kept alike.

* The learning rate after ``s`` optimizer steps: ``lr * lr_factor(s)`` (``config.lr_factor``: warmup, then linear /
  cosine decay or constant), a ``LambdaLR`` stepped once per optimizer step (``lr_schedule``).
* Dev evaluations (``Cadence.evaluates``): one at step 0, before training, then after step ``s`` (1-based) when
  ``eval_every`` divides ``s`` (``eval_every = 0``: never) and after the last step ``s = steps``.
* Keep-best (``KeepBest.offer``): an evaluation's tensors are kept when its score ``m_s`` is strictly above the best
  so far, ``m_s > max_{t < s} m_t`` (ties keep the earlier step; the first evaluation is always kept, and so is every
  evaluation without a score, i.e. without dev: the last adapter); one that is not counts a bad evaluation
  (reset to 0 by the next kept one).
* Early stop (``Cadence.stop``): after an evaluation before the last step, when the caller's ``on_eval(step, score)``
  answers ``True`` (``training/tune.py`` prunes a trial so; it is called after every evaluation past step 0, the
  last included, where its answer is ignored) or ``patience > 0`` evaluations in a row were bad.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from softprompts.training.config import TrainConfig, lr_factor

EvalCallback = Callable[[int, float], bool]  # (step, dev metric after it) -> stop training now


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of ``config`` on ``optimizer``: every group's rate times ``lr_factor(step)``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))


@dataclass
class KeepBest:
    """The best evaluation so far: its score (``None``: not evaluated yet, or no dev), step and tensors (name ->
    tensor, a copy), and how many evaluations since did not improve on it."""

    best_metric: float | None = None
    best_step: int = 0
    best_tensors: dict | None = None
    bad_evals: int = 0

    def offer(self, step: int, score: float | None, tensors: Callable[[], dict]) -> bool:
        """Keep ``tensors()`` (called only when kept) as the best if ``score`` improves strictly on the best so far
        (or nothing is kept yet, or there is no score to compare); otherwise count a bad evaluation. ``True`` when
        kept."""
        if self.best_metric is None or (score is not None and score > self.best_metric):
            self.best_metric, self.best_step, self.bad_evals = score, step, 0
            self.best_tensors = tensors()
            return True
        self.bad_evals += 1
        return False


@dataclass(frozen=True)
class Cadence:
    """When a run of ``steps`` optimizer steps evaluates on dev (``eval_every``) and stops early (``patience``)."""

    steps: int
    eval_every: int = 0
    patience: int = 0

    @classmethod
    def of(cls, config: TrainConfig) -> Cadence:
        return cls(config.steps, config.eval_every, config.patience)

    def evaluates(self, step: int) -> bool:
        """Whether dev is evaluated after optimizer step ``step`` (1-based; step 0 always is, before training)."""
        return bool(self.eval_every and step % self.eval_every == 0) or step == self.steps

    def stop(self, step: int, score: float | None, best: KeepBest, on_eval: EvalCallback | None) -> str | None:
        """After the dev evaluation that followed ``step``: why training stops here (``"asked"``: ``on_eval``
        answered ``True``; ``"patience"``: ``patience`` bad evaluations in a row), or ``None`` to go on (always at
        the last step). ``on_eval`` is called in every case."""
        asked = on_eval is not None and bool(on_eval(step, score))
        if step >= self.steps:
            return None
        if asked:
            return "asked"
        if self.patience and best.bad_evals >= self.patience:
            return "patience"
        return None


__all__ = ["Cadence", "EvalCallback", "KeepBest", "lr_schedule"]
