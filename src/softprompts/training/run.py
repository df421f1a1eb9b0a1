"""One training run as a record (``Run``): its parts, the loop's state (``TrainState``), and the two files made from
them, the checkpoint a bitwise resume reads back and the record ``training.json``. ``loop.py`` drives the steps.

The checkpoint ``OUT.checkpoint.pt`` (next to the output directory, which only appears at the end; written atomically
by the main rank, read by rank 0 and broadcast)::

    {"config", "state" (TrainState), "method", "optimizer", "scheduler" (state dicts), "rng" (rank 0's RNG states),
     "rank_rng" (every rank's), "world_size", "environment"}

The data order is a pure function of ``(seed, epoch)``, so with these states a resumed run continues bitwise. A
checkpoint written with another training configuration is refused (``resumable``: what may differ, e.g.
``progress``, is left out of the comparison); resumed on another world size, every rank takes rank 0's RNG states.

The environment (``environment``: device, dtype, world size, torch's CPU thread count, library versions) decides
bitwise equality too (measured: a run at 2 threads differs from one at 1 thread, the reduction order of the matmuls
changes), so the checkpoint stores it and a resume in another one says which entries changed
(``environment_changes``) and goes on, no longer bitwise the uninterrupted run.
"""

from __future__ import annotations

import platform
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers

from softprompts.errors import SoftpromptsError
from softprompts.files import atomic_file
from softprompts.metrics import PRIMARY_METRIC
from softprompts.tasks import TaskSpec
from softprompts.training.cadence import EvalCallback, KeepBest
from softprompts.training.config import REPORTING, TrainConfig
from softprompts.training.distributed import Distributed
from softprompts.training.preflight import TrainData, log
from softprompts.training.trackers import Trackers

BITWISE_KEYS = ("device", "dtype", "world_size", "torch_threads", "torch", "transformers")


@dataclass
class TrainState(KeepBest):
    """Everything a checkpoint restores besides module, optimizer, scheduler and RNG states: the keep-best record
    (``cadence.KeepBest``: best dev metric, its step and adapter tensors, bad evaluations since) and the loop's
    counters."""

    step: int = 0
    curve: list = field(default_factory=list)
    base_dev: dict | None = None
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    tokens: int = 0
    stopped_early: bool = False
    tracker_runs: dict = field(default_factory=dict)  # tracker -> its run id, so a resume continues that run


@dataclass
class Run:
    """One training run: the method (and its DDP wrapper ``model``), optimizer, schedule and the loop's
    ``TrainState``, with the data, the checkpoint path (``None``: no checkpoints) and the environment it records."""

    base: object
    method: torch.nn.Module
    spec: TaskSpec
    config: TrainConfig
    dist: Distributed
    data: TrainData
    ckpt: Path | None
    env: dict
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState = field(default_factory=TrainState)
    on_eval: EvalCallback | None = None
    trackers: Trackers = field(default_factory=Trackers)

    @property
    def metric(self) -> str:
        """The task's primary dev metric, the one that picks the best adapter."""
        return PRIMARY_METRIC[self.spec.task]

    def save_checkpoint(self) -> None:
        """Write the checkpoint from the run's state (a collective: every rank sends its RNG states, the main rank
        writes the file); nothing without a checkpoint path."""
        if self.ckpt is None:
            return
        rngs = self.dist.gather_objects(rng_state())
        if not self.dist.is_main:
            return
        atomic_save({"config": asdict(self.config), "state": asdict(self.state), "method": self.method.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": rngs[0], "rank_rng": rngs, "world_size": self.dist.world_size, "environment": self.env},
                    self.ckpt)

    def load_checkpoint(self) -> None:
        """Continue from the checkpoint: method, optimizer, scheduler, this rank's RNG states and the loop's state
        (the file read by rank 0, broadcast); refused when written with another training configuration."""
        dist, path = self.dist, self.ckpt
        saved = dist.broadcast_object(  # our own file: RNG states are not tensors
            torch.load(path, map_location="cpu", weights_only=False) if dist.is_main else None
        )
        if resumable(saved["config"]) != resumable(asdict(self.config)):
            raise SoftpromptsError(
                f"{path} was written with another training configuration; resume with the same flags")
        self.method.load_state_dict(saved["method"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = TrainState(**saved["state"])
        same_world = saved.get("world_size", 1) == dist.world_size and "rank_rng" in saved
        set_rng_state(saved["rank_rng"][dist.rank] if same_world else saved["rng"])
        log(dist, f"resuming from {path} at step {self.state.step}")
        changed = environment_changes(saved.get("environment"), self.env)
        if changed:
            log(dist, f"warning: resuming in another environment ({'; '.join(changed)}): training continues, but the "
                      "result is not bitwise the one an uninterrupted run gives (same threads, device, dtype and "
                      "library versions are needed for that)")

    def record(self) -> dict:
        """The training record, ``training.json``; flags (and warns about) a best adapter below the bare model on
        dev."""
        state, method, metric, data, env = self.state, self.method, self.metric, self.data, self.env
        record = {
            "method": method.name,
            "method_config": method.config.to_json(),
            "trainable_parameters": method.num_trainable(),
            "train_config": asdict(self.config),
            "task": self.spec.to_json(),
            "data": {"train_examples": len(data.encoded), "dev_examples": len(data.dev),
                     "truncation": asdict(data.report)},
            "metric": f"dev_{metric}",
            "base_model_dev": state.base_dev,
            "best_step": state.best_step,
            "best_dev": state.best_metric,
            "steps_done": state.step,
            "stopped_early": state.stopped_early,
            "curve": state.curve,
            "timings": {
                "train_seconds": round(state.train_seconds, 3),
                "eval_seconds": round(state.eval_seconds, 3),
                "tokens": state.tokens,
                "tokens_per_second": round(state.tokens / max(state.train_seconds, 1e-9), 1),
            },
            "device": {k: env[k] for k in ("device", "dtype", "world_size")},
            "environment": env,
        }
        if state.base_dev is not None and state.best_metric is not None and state.best_metric < state.base_dev[metric]:
            record["below_base_model"] = True
            log(self.dist, f"warning: the best adapter (dev {metric} {state.best_metric:.4f}) is below the base "
                           f"model without an adapter ({state.base_dev[metric]:.4f}); train longer (--steps), try "
                           "another --lr or --init, or serve the base model for this task")
        return record


# --- the environment, RNG states and files the checkpoint is made of ---------------------------------------------


def environment(base, world_size: int) -> dict:
    """Where the run computes: what decides bitwise equality (``BITWISE_KEYS``) and the Python version."""
    return {
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "world_size": world_size,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def environment_changes(saved: dict | None, now: dict) -> list[str]:
    """``"key: saved -> now"`` for each entry that decides bitwise equality and differs (none for old checkpoints)."""
    if not saved:
        return []
    return [f"{k}: {saved.get(k)} -> {now.get(k)}" for k in BITWISE_KEYS if saved.get(k) != now.get(k)]


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


__all__ = ["BITWISE_KEYS", "Run", "TrainState", "atomic_save", "environment", "environment_changes", "resumable",
           "rng_state", "seed_everything", "set_rng_state"]
