"""Process-group plumbing for data-parallel training under ``torchrun`` (one no-op implementation for 1 process).

The training loop talks to a ``Distributed`` object only: which examples this rank takes, summing numbers across
ranks, gathering evaluation results, and whether this rank writes files. With one process every call is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list) -> list:
        """This rank's share of a global batch: items ``rank, rank + N, ...`` (the same global batch for any N)."""
        return items[self.rank :: self.world_size]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel over the adapter only (the frozen base has no gradients to reduce)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if torch.cuda.is_available() and next(module.parameters()).is_cuda else None
        return DistributedDataParallel(module, device_ids=device_ids)


def setup_distributed() -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)
