"""Preflight for ``loop.train``: everything that can be refused is refused before the first step.

The options (``TrainConfig.validate``, then what they ask of this base model and device: a capability question,
``base.require``), the output directory and whether to resume, and the data: encoded, its placement possible, every
training row and dev prompt within the model's context.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from softprompts.errors import SoftpromptsError
from softprompts.evaluate import verbalizations
from softprompts.model.placement import PlacementError, beyond_start
from softprompts.tasks import Encoded, TaskSpec, TruncationReport, encode, epoch_batches, prompt_ids
from softprompts.training.config import TrainConfig
from softprompts.training.distributed import Distributed
from softprompts.training.guards import check_fits_context
from softprompts.training.trackers import only_logs


def log(dist: Distributed, message: str) -> None:
    """``message`` on stderr from the main rank only (``tqdm.write``: above the progress bar)."""
    if dist.is_main:
        tqdm.write(message, file=sys.stderr)


def check_options(base, config: TrainConfig) -> None:
    """The configuration on its own (``TrainConfig.validate``), then what it asks of this base model and device."""
    config.validate()
    if config.autocast_bf16 and base.device.type != "cuda":
        raise SoftpromptsError(f"--bf16 (bf16 autocast) needs a CUDA device; the base model is on {base.device}")
    if config.compile:
        base.require("compile", flag="--compile")
    if config.gradient_checkpointing:
        base.require("gradient_checkpointing", flag="--gradient-checkpointing")


def checkpoint_path(out_dir: str | Path) -> Path:
    """``OUT.checkpoint.pt`` next to the output directory (which only appears, atomically, at the end)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.checkpoint.pt"


def output_paths(out_dir, resume: bool, overwrite: bool, dist: Distributed) -> tuple[Path | None, Path | None, bool]:
    """``(out_dir, checkpoint path, resuming)``; refuses an existing ``out_dir`` unless overwriting or resuming (or
    it holds only trackers' logs: a run stopped before its first checkpoint, ``trackers.only_logs``).

    Rank 0 decides whether to resume (and later reads the checkpoint for everyone): ranks need not share a filesystem.
    """
    out_dir = Path(out_dir) if out_dir is not None else None
    ckpt = checkpoint_path(out_dir) if out_dir is not None else None
    resuming = bool(dist.broadcast_object(resume and ckpt is not None and ckpt.is_file() if dist.is_main else None))
    if out_dir is not None and out_dir.exists() and not (overwrite or resuming or only_logs(out_dir)):
        raise FileExistsError(f"{out_dir} already exists; choose another directory or pass --overwrite")
    return out_dir, ckpt, resuming


@dataclass
class TrainData:
    """The run's data, encoded and checked: training examples (with their encoding report) and dev examples."""

    encoded: list
    report: object  # tasks.encode's report: what was cut or dropped
    dev: list
    lengths: list[int]  # of the encoded training examples: batches group similar lengths
    per_epoch: int  # optimizer steps per epoch

    def global_batch(self, step: int, config: TrainConfig) -> list[int]:
        """Indices of step ``step``'s global batch: a pure function of ``(seed, epoch)``, so a resume continues it."""
        epoch, index = divmod(step, self.per_epoch)
        return epoch_batches(len(self.encoded), self.lengths, config.batch_size, config.seed, epoch)[index]


def prepare_data(base, method, train_examples, dev_examples, spec: TaskSpec, config: TrainConfig,
                 dist: Distributed) -> TrainData:
    """Encode the training data (logging what was cut), take the first ``eval_limit`` dev examples, and check both.
    ``train_examples``: ``Example`` rows, or ``tasks.Encoded`` rows the caller encoded (with soft targets)."""
    if not train_examples:
        raise SoftpromptsError("the training data is empty")
    if all(isinstance(e, Encoded) for e in train_examples):  # encoded by the caller (distillation rows)
        encoded, report = list(train_examples), TruncationReport(examples=len(train_examples))
    else:
        encoded, report = encode(base, train_examples, spec)
    if report.message(spec, "training data"):
        log(dist, report.message(spec, "training data"))
    dev = list(dev_examples or [])[: config.eval_limit] if dev_examples else []
    check_fits(base, method, spec, encoded, dev)
    lengths = [e.length for e in encoded]
    per_epoch = len(epoch_batches(len(encoded), lengths, config.batch_size, config.seed, 0))
    return TrainData(encoded=encoded, report=report, dev=dev, lengths=lengths, per_epoch=per_epoch)


def check_fits(base, method, spec: TaskSpec, encoded: list, dev: list) -> None:
    """A KV prefix cannot be placed after text (after the base's BOS alone it stands in for it:
    ``placement.beyond_start``); training rows and dev prompts (+ the longest answer) must fit the model's context
    with the virtual tokens."""
    virtual = method.config.num_virtual_tokens
    if method.artifact_kind == "kv_prefix" and any(beyond_start(base, e.lead_ids) for e in encoded):
        raise PlacementError(f"{method.name} makes a KV prefix, which sits in front of everything: it cannot be "
                             "placed after text (the <|virtual|> marker or a chat placement); use prompt tuning or "
                             "P-tuning for a placement")
    check_fits_context(base, virtual, [(len(e.lead_ids) + len(e.prompt_ids), len(e.target_ids)) for e in encoded],
                       "training data")
    answer = spec.max_target_tokens if spec.task != "classify" else max(
        len(v) for v in verbalizations(base, spec))  # decoded, or the longest label
    dev_rows = [(sum(map(len, prompt_ids(base, ex.prompt, spec))), answer) for ex in dev]
    check_fits_context(base, virtual, dev_rows, "dev data")


__all__ = ["TrainData", "check_fits", "check_options", "checkpoint_path", "log", "output_paths", "prepare_data"]
