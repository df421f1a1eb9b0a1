"""The training checkpoint: everything a bitwise resume needs, written atomically by the main rank and read back on
every rank.

    {"config", "state" (TrainState), "method", "optimizer", "scheduler" (state dicts), "rng" (rank 0's RNG states),
     "rank_rng" (every rank's), "world_size", "environment"}

A checkpoint written with another training configuration is refused (``state.resumable``: what may differ, e.g.
``progress``, is left out of the comparison); another environment (threads, device, dtype, library versions) only
warns, since training continues but is no longer bitwise the uninterrupted run. Resumed on another world size, every
rank takes rank 0's RNG states.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from softprompts.errors import SoftpromptsError
from softprompts.training.config import TrainConfig
from softprompts.training.distributed import Distributed
from softprompts.training.preflight import log
from softprompts.training.record import environment_changes
from softprompts.training.state import TrainState, atomic_save, resumable, rng_state, set_rng_state


def write_checkpoint(path: Path, dist: Distributed, config: TrainConfig, state: TrainState, method, optimizer,
                     scheduler, env: dict) -> None:
    """Every rank sends its RNG states (a collective: all ranks call this); the main rank writes the file."""
    rngs = dist.gather_objects(rng_state())
    if not dist.is_main:
        return
    atomic_save({"config": asdict(config), "state": asdict(state), "method": method.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs[0],
                 "rank_rng": rngs, "world_size": dist.world_size, "environment": env}, path)


def read_checkpoint(path: Path, dist: Distributed, config: TrainConfig, method, optimizer, scheduler,
                    env: dict) -> TrainState:
    """Restore method, optimizer, scheduler and this rank's RNG states (the file read by rank 0, broadcast); the
    loop's ``TrainState``."""
    saved = dist.broadcast_object(  # our own file: RNG states are not tensors
        torch.load(path, map_location="cpu", weights_only=False) if dist.is_main else None
    )
    if resumable(saved["config"]) != resumable(asdict(config)):
        raise SoftpromptsError(f"{path} was written with another training configuration; resume with the same flags")
    method.load_state_dict(saved["method"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state = TrainState(**saved["state"])
    same_world = saved.get("world_size", 1) == dist.world_size and "rank_rng" in saved
    set_rng_state(saved["rank_rng"][dist.rank] if same_world else saved["rng"])
    log(dist, f"resuming from {path} at step {state.step}")
    changed = environment_changes(saved.get("environment"), env)
    if changed:
        log(dist, f"warning: resuming in another environment ({'; '.join(changed)}): training continues, but the "
                  "result is not bitwise the one an uninterrupted run gives (same threads, device, dtype and library "
                  "versions are needed for that)")
    return state


__all__ = ["read_checkpoint", "write_checkpoint"]
