"""What a training checkpoint holds and how it is written: the loop's state, RNG states, atomic saves, and which
configuration changes a resume accepts.

A checkpoint ``OUT.checkpoint.pt`` (next to the output directory, which only appears at the end) holds the method,
optimizer and scheduler state dicts, every rank's RNG states and ``TrainState``; the data order is a pure function
of ``(seed, epoch)``, so a resumed run continues bitwise.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from softprompts.files import atomic_file
from softprompts.training.config import REPORTING, TrainConfig


@dataclass
class TrainState:
    """Everything a checkpoint restores (besides module/optimizer/scheduler/RNG states)."""

    step: int = 0
    curve: list = field(default_factory=list)
    best_metric: float | None = None
    best_step: int = 0
    best_tensors: dict | None = None
    bad_evals: int = 0
    base_dev: dict | None = None
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    tokens: int = 0
    stopped_early: bool = False
    tracker_runs: dict = field(default_factory=dict)  # tracker -> its run id, so a resume continues that run


def checkpoint_path(out_dir: str | Path) -> Path:
    """``OUT.checkpoint.pt`` next to the output directory (which only appears, atomically, at the end)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.checkpoint.pt"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators at the start of training, for whatever draws from them
    (a model with dropout active, library code). Our own code does not: a method's initialization uses its own
    seeded generator and the data order is ``tasks.epoch_batches(seed, epoch)``. Checkpoints save these states so a
    resumed run continues bitwise either way."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` into ``path`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    atomic_file(path, lambda tmp: torch.save(obj, tmp))


def resumable(config: dict) -> dict:
    """The configuration a resume must match: checkpoints from before an option existed hold its default, and
    gradient checkpointing and compilation (same gradients, only memory/time) and the trackers may be switched either
    way."""
    return {**asdict(TrainConfig()), **config, "gradient_checkpointing": None, "compile": None,
            **dict.fromkeys(REPORTING)}


__all__ = ["TrainState", "atomic_save", "checkpoint_path", "resumable", "rng_state", "seed_everything", "set_rng_state"]
