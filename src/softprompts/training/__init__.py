"""Training: one loop for every method (``loop.py``), its configuration and schedule (``config.py``), the run with
its resumable checkpoint and record (``run.py``), the schedule, evaluation and keep-best rules it shares with
compare's PEFT loop (``cadence.py``), the optimizer step (``step.py``; the loss is the base model's,
``FrozenBase.label_loss_sum``), gradient checkpointing (``grad_checkpoint.py``) and the process-group plumbing for
``torchrun`` (``distributed.py``); cartridges: self-study on a corpus (``self_study.py``), the teacher's targets
(``distill.py``) and the run that distills them (``cartridge.py``).

    from softprompts.training import TrainConfig, train
    result = train(base, method, train_examples, spec, TrainConfig(steps=100, lr=3e-2), dev_examples=dev,
                   out_dir="runs/sentiment")          # result.adapter: the best on dev; result.record: training.json
"""

import importlib
from typing import TYPE_CHECKING

# name -> the module that defines it, imported on first use (PEP 562): the command line reads TrainConfig's and
# SelfStudyConfig's defaults for its help without loading torch and transformers
_EXPORTS = {
    "train_cartridge": "cartridge", "SCHEDULES": "config", "SelfStudyConfig": "config", "TrainConfig": "config",
    "lr_factor": "config", "Distributed": "distributed", "setup_distributed": "distributed",
    "RECORD_FILE": "loop", "TrainResult": "loop", "train": "loop", "checkpoint_path": "preflight",
}

__all__ = ["RECORD_FILE", "SCHEDULES", "Distributed", "SelfStudyConfig", "TrainConfig", "TrainResult",
           "checkpoint_path", "lr_factor", "setup_distributed", "train", "train_cartridge"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'softprompts.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"softprompts.training.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from softprompts.training.cartridge import train_cartridge
    from softprompts.training.config import SCHEDULES, SelfStudyConfig, TrainConfig, lr_factor
    from softprompts.training.distributed import Distributed, setup_distributed
    from softprompts.training.loop import RECORD_FILE, TrainResult, train
    from softprompts.training.preflight import checkpoint_path
