"""Process-group plumbing for data-parallel training under ``torchrun`` (one no-op implementation for 1 process).

The training loop talks to a ``Distributed`` object only: which examples this rank takes, summing numbers across
ranks, gathering evaluation results, sharing the checkpoint rank 0 read, and whether this rank writes files. With one
process every call is the identity.

What is distributed: the *adapter* (the method module: a few thousand to a few million parameters) is replicated on
every rank and wrapped in ``DistributedDataParallel``, so only its gradients are all-reduced. The frozen base model is
never part of DDP (it has no gradients); each rank holds a copy on its own device, or, for a base that does not fit
one device, one process per node spreads it over that node's GPUs with ``device_map`` (see docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    """This process's place in the group: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files, logs and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part (collectives are real)."""
        return self.world_size > 1

    @property
    def device(self) -> torch.device | None:
        """Where this rank puts the base model: ``cuda:LOCAL_RANK`` under NCCL, else None (leave it where it loads)."""
        if self.enabled and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return None

    def shard(self, items: list) -> list:
        """This rank's share of a global batch: items ``rank, rank + N, ...`` (the same global batch for any N)."""
        return items[self.rank :: self.world_size]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (and return it). CPU tensors travel via this rank's GPU under NCCL."""
        if not self.enabled:
            return tensor
        if dist.get_backend() == "nccl" and not tensor.is_cuda:
            on_gpu = tensor.to(torch.device("cuda", self.local_rank))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            tensor.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_objects(self, obj: Any) -> list:
        """Every rank's ``obj`` in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (other ranks may pass None)."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.enabled:
            dist.barrier()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel over the adapter only (the frozen base has no gradients to reduce)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if torch.cuda.is_available() and next(module.parameters()).is_cuda else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def close(self) -> None:
        """Leave the process group (after a final barrier), so that ``torchrun`` sees a clean exit."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def setup_distributed() -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on CUDA).

    Without ``WORLD_SIZE`` > 1 (a plain ``python -m softprompts``) nothing is initialized and the result is the
    single-process no-op ``Distributed()``.
    """
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
