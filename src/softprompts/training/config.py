"""The training configuration (``TrainConfig``, validated with actionable messages) and the learning-rate schedule.

Schedule: linear warmup over ``w = int(warmup_ratio * steps)`` steps, ``lr * (s + 1) / w``, then ``lr * f(p)`` with
``p = (s - w) / (steps - w)`` and ``f(p) = 1 - p`` (linear), ``(1 + cos(pi p)) / 2`` (cosine) or ``1`` (constant).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from softprompts.errors import SoftpromptsError
from softprompts.training.trackers import report_problems

SCHEDULES = ("linear", "cosine", "constant")
REPORTING = ("report_to", "report_dir", "run_name", "run_group")  # where a run is watched, not what it computes


@dataclass(frozen=True)
class TrainConfig:
    """steps: optimizer steps. batch_size: examples per step (global, over all ranks and micro-batches).
    grad_accum: micro-batches per step per rank. warmup_ratio: fraction of steps with linear warmup, then
    ``schedule`` decays to 0. eval_every / checkpoint_every: in steps (0 = only at the end). patience: evaluations
    without dev improvement before stopping (0 = never). eval_limit: evaluate on the first N dev examples only.
    gradient_checkpointing: recompute the base's decoder layers in the backward pass (less activation memory, more
    time; same gradients, every method). autocast_bf16: run the micro-batches under bf16 ``torch.autocast`` (CUDA
    only: ``train`` refuses it on other devices; useful for an fp32 base, a no-op for a bf16 one). compile:
    ``torch.compile`` the micro-batch loss (``step.compiled_loss``; same gradients, faster steps after a
    one-time compilation; not together with gradient_checkpointing: ``errors`` refuses the pair, the one place
    that checks it; whether the base model supports either is asked of the base, ``base.require``). report_to: the
    trackers that watch the run, comma-separated (``none``, ``tensorboard``, ``mlflow``, ``wandb``, ``trackio``;
    ``trackers.py``); their offline stores go under the output directory, or under ``report_dir`` when several runs
    share one (compare, tune); run_name / run_group: the run's name (default: the output directory's) and the
    experiment or project grouping runs (default ``softprompts``). None of the four is part of what a resume must
    match."""

    steps: int = 100
    lr: float = 3e-2
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    eval_every: int = 25
    eval_limit: int | None = None
    eval_batch_size: int = 16
    patience: int = 0
    checkpoint_every: int = 25
    seed: int = 0
    progress: bool = True
    gradient_checkpointing: bool = False
    autocast_bf16: bool = False
    compile: bool = False
    report_to: str = "none"
    report_dir: str | None = None
    run_name: str | None = None
    run_group: str | None = None

    def errors(self) -> list[str]:
        problems = []
        if not isinstance(self.steps, int) or self.steps < 1:
            problems.append(f"--steps must be a positive integer, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"--lr must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            problems.append(f"max_grad_norm must be a finite number >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if self.batch_size < 1 or self.grad_accum < 1:
            problems.append("--batch-size and --grad-accum must be at least 1")
        if self.eval_limit is not None and self.eval_limit < 1:
            problems.append(f"--eval-limit must be at least 1 (or left out for all of dev), got {self.eval_limit}")
        if self.eval_batch_size < 1:
            problems.append(f"eval_batch_size must be at least 1, got {self.eval_batch_size}")
        if self.schedule not in SCHEDULES:
            problems.append(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if min(self.eval_every, self.checkpoint_every, self.patience) < 0:
            problems.append("--eval-every, --checkpoint-every and --patience must be >= 0")
        if self.compile and self.gradient_checkpointing:
            problems.append("--compile and --gradient-checkpointing cannot be combined; choose one")
        return problems + report_problems(self.report_to)

    def validate(self) -> TrainConfig:
        problems = self.errors()
        if problems:
            raise SoftpromptsError("; ".join(problems))
        return self


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``lr`` at ``step``: linear warmup over ``w`` steps, then linear/cosine decay to 0 at ``steps``."""
    warm = int(config.warmup_ratio * config.steps)
    if step < warm:
        return (step + 1) / warm
    if config.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, config.steps - warm)
    return max(0.0, 1 - progress) if config.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class SelfStudyConfig:
    """conversations: how many to generate; chunk_tokens: the longest chunk (``data/corpus.py``);
    question_tokens / answer_tokens: the most new tokens of each phase; temperature: sampling of both phases;
    top_k: the teacher's tokens kept per target position (``model/soft_targets.py``); batch_size: rows decoded (and
    scored by the teacher) together; seed: the draws of chunks, kinds and samples."""

    conversations: int = 256
    chunk_tokens: int = 512
    question_tokens: int = 48
    answer_tokens: int = 96
    temperature: float = 0.7
    top_k: int = 20
    batch_size: int = 16
    seed: int = 0

    def errors(self) -> list[str]:
        problems = [f"--{name.replace('_', '-')} must be a positive integer, got {value!r}"
                    for name, value in asdict(self).items()
                    if name not in ("temperature", "seed") and (not isinstance(value, int) or value < 1)]
        if not isinstance(self.temperature, int | float) or not 0 <= self.temperature <= 2:
            problems.append(f"--self-study-temperature must be in [0, 2], got {self.temperature!r}")
        return problems

    def recipe(self) -> dict:
        """What the conversations depend on (a saved set is reused only when this matches)."""
        return {k: v for k, v in asdict(self).items() if k not in ("top_k", "batch_size")}


__all__ = ["REPORTING", "SCHEDULES", "SelfStudyConfig", "TrainConfig", "lr_factor"]
