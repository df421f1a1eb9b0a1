"""Dev metrics during training: every rank scores its shard of the dev examples, the outputs are merged back in dev
order, and the task's metrics are computed from the whole set (identical on every rank)."""

from __future__ import annotations

from softprompts.evaluate import evaluate
from softprompts.metrics import score_outputs
from softprompts.tasks import TaskSpec
from softprompts.training.config import TrainConfig
from softprompts.training.distributed import Distributed


def dev_score(base, artifact, dev, spec: TaskSpec, config: TrainConfig, dist: Distributed) -> dict:
    """Dev metrics of ``artifact`` (``None``: the bare model); ranks evaluate disjoint shards and combine their
    outputs."""
    mine = dist.shard(dev)  # may be empty when dev has fewer examples than ranks
    result = evaluate(base, artifact, mine, spec, config.eval_batch_size, return_outputs=True) if mine else {}
    outputs = merge(dist, dev, result.get("outputs", []))
    if spec.task == "classify":
        return score_outputs(spec, dev, outputs)
    return score_outputs(spec, dev, outputs, merge(dist, dev, result.get("target_logprobs", [])))


def merge(dist: Distributed, dev: list, mine: list) -> list:
    """Every rank's per-example values (rank ``r`` holds examples ``r, r + N, ...``) back in dev order."""
    merged = [None] * len(dev)
    for rank, values in enumerate(dist.gather_objects(mine)):
        merged[rank :: dist.world_size] = values
    return merged


__all__ = ["dev_score", "merge"]
