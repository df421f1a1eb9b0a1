"""What a training run records about itself: ``training.json`` and the environment that decides bitwise resume.

``environment(base, dist)``: device, dtype, world size, torch's CPU thread count and the library versions. A resumed
run continues bitwise only in the same environment (measured: a run at 2 threads differs from one at 1 thread, the
reduction order of the matmuls changes), so checkpoints store it and a resume in another environment says which
entries changed (``environment_changes``) instead of silently differing.
"""

from __future__ import annotations

import platform
from dataclasses import asdict

import torch
import transformers

from softprompts.training.state import TrainState

BITWISE_KEYS = ("device", "dtype", "world_size", "torch_threads", "torch", "transformers")


def environment(base, world_size: int) -> dict:
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


def training_record(config, state: TrainState, method, spec, report, metric: str, n_train: int, n_dev: int,
                    env: dict) -> dict:
    """The training record saved as ``training.json``."""
    return {
        "method": method.name,
        "method_config": method.config.to_json(),
        "trainable_parameters": method.num_trainable(),
        "train_config": asdict(config),
        "task": spec.to_json(),
        "data": {"train_examples": n_train, "dev_examples": n_dev, "truncation": asdict(report)},
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


__all__ = ["BITWISE_KEYS", "environment", "environment_changes", "training_record"]
