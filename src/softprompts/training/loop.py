"""One training loop for every method: AdamW on the method's own parameters, the base model frozen.

One optimizer step over a global batch ``G`` (``batch_size`` examples, sharded over ranks, cut into ``grad_accum``
micro-batches per rank)::

    A      = method()                          # the artifact, computed ONCE per step (prefix MLP, P-tuning encoder)
    A'     = detach(A) as leaf tensors         # micro-batches backprop into A' only
    N      = sum over G of target tokens       # all-reduced over ranks
    loss_m = sum_{target tokens in m} -log p(y | A', x, y_<) / N ,  loss_m.backward()   for every micro-batch m
    A.backward(A'.grad)                        # one exact backward through the method: dLoss/dA = sum_m dloss_m/dA'

so accumulation and data parallelism give exactly the gradient of one big batch with the token-mean loss
``sum_G token losses / N``. (DDP averages gradients over ranks; ``A'.grad`` is scaled by the world size to undo it.)
The LM head runs only at label positions (``logits_positions``); batches group examples of similar length. The step
itself is ``step.accumulate_step`` (also what the benchmark times), optionally under bf16 autocast
(``autocast_bf16``, CUDA only) and with decoder-layer gradient checkpointing (``gradient_checkpointing``).

Evaluation on dev runs at step 0 (so the kept adapter is never worse on dev than its init) and every ``eval_every``
steps; the best adapter is kept and training stops early after ``patience`` evaluations without improvement.
Checkpoints (atomic) hold everything needed to continue bitwise: method, optimizer, scheduler and RNG states, the
step (the data order is a pure function of ``(seed, epoch)``), curve and best adapter so far.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from softprompts.adapter import Adapter
from softprompts.adapter_io import save_adapter
from softprompts.errors import SoftpromptsError
from softprompts.evaluate import evaluate, verbalizations
from softprompts.metrics import PRIMARY_METRIC, score_outputs
from softprompts.model.artifacts import artifact_from_tensors
from softprompts.model.placement import PlacementError
from softprompts.tasks import TaskSpec, collate, encode, epoch_batches, prompt_ids
from softprompts.training.config import TrainConfig, lr_factor
from softprompts.training.distributed import Distributed
from softprompts.training.guards import check_fits_context, check_parameters, check_step, step_update
from softprompts.training.record import environment, environment_changes, training_record
from softprompts.training.state import (
    TrainState,
    atomic_save,
    checkpoint_path,
    resumable,
    rng_state,
    seed_everything,
    set_rng_state,
)
from softprompts.training.step import accumulate_step, compiled_loss, label_loss_sum

RECORD_FILE = "training.json"


@dataclass
class TrainResult:
    adapter: Adapter  # the best adapter on dev (the last one without dev data)
    record: dict  # what training.json holds


def _log(dist: Distributed, message: str) -> None:
    if dist.is_main:
        tqdm.write(message, file=sys.stderr)


def _dev_score(base, artifact, dev, spec: TaskSpec, config: TrainConfig, dist: Distributed) -> dict:
    """Dev metrics; ranks evaluate disjoint shards and combine their outputs (identical metrics on every rank)."""
    mine = dist.shard(dev)  # may be empty when dev has fewer examples than ranks
    result = evaluate(base, artifact, mine, spec, config.eval_batch_size, return_outputs=True) if mine else {}
    outputs = _merge(dist, dev, result.get("outputs", []))
    if spec.task == "classify":
        return score_outputs(spec, dev, outputs)
    return score_outputs(spec, dev, outputs, _merge(dist, dev, result.get("target_logprobs", [])))


def _merge(dist: Distributed, dev: list, mine: list) -> list:
    """Every rank's per-example values (rank ``r`` holds examples ``r, r + N, ...``) back in dev order."""
    merged = [None] * len(dev)
    for rank, values in enumerate(dist.gather_objects(mine)):
        merged[rank :: dist.world_size] = values
    return merged


def train(
    base,
    method,
    train_examples,
    spec: TaskSpec,
    config: TrainConfig,
    dev_examples=None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    dist: Distributed | None = None,
    base_dev: dict | None = None,
) -> TrainResult:
    """Train ``method`` (a ``PromptMethod`` built on ``base``) and return the best adapter and the training record.

    With ``out_dir`` the adapter, ``training.json`` and (during training) ``OUT.checkpoint.pt`` are written by the
    main rank; ``resume`` continues from that checkpoint. ``base_dev``: the bare model's metrics on the same dev
    examples (the first ``eval_limit``) when the caller has them already (``compare`` and ``demo`` train several
    methods on one dev set); otherwise they are computed once before training.
    """
    config.validate()
    if config.autocast_bf16 and base.device.type != "cuda":
        raise SoftpromptsError(f"--bf16 (bf16 autocast) needs a CUDA device; the base model is on {base.device}")
    if base.is_encoder_decoder and (config.compile or config.gradient_checkpointing):
        flag = "--compile" if config.compile else "--gradient-checkpointing"
        raise SoftpromptsError(f"{flag} runs on decoder-only models; {base.name} is an encoder-decoder model: train "
                               f"it without {flag}")
    dist = dist or Distributed()
    out_dir = Path(out_dir) if out_dir is not None else None
    ckpt = checkpoint_path(out_dir) if out_dir is not None else None
    # rank 0 decides (and later reads the checkpoint for everyone): ranks need not share a filesystem
    resuming = bool(dist.broadcast_object(resume and ckpt is not None and ckpt.is_file() if dist.is_main else None))
    if out_dir is not None and out_dir.exists() and not (overwrite or resuming):
        raise FileExistsError(f"{out_dir} already exists; choose another directory or pass --overwrite")
    if not train_examples:
        raise SoftpromptsError("the training data is empty")
    encoded, report = encode(base, train_examples, spec)
    if report.message(spec, "training data"):
        _log(dist, report.message(spec, "training data"))
    dev = list(dev_examples or [])[: config.eval_limit] if dev_examples else []
    virtual = method.config.num_virtual_tokens
    if method.artifact_kind == "kv_prefix" and any(e.lead_ids for e in encoded):
        raise PlacementError(f"{method.name} makes a KV prefix, which sits in front of everything: it cannot be "
                             "placed after text (the <|virtual|> marker or a chat placement); use prompt tuning or "
                             "P-tuning for a placement")
    check_fits_context(base.context_limit, virtual, [e.length for e in encoded], "training data")
    answer = spec.max_target_tokens if spec.task != "classify" else max(
        len(v) for v in verbalizations(base, spec))  # decoded, or the longest label
    dev_lengths = [sum(map(len, prompt_ids(base, ex.prompt, spec))) + answer for ex in dev]
    check_fits_context(base.context_limit, virtual, dev_lengths, "dev data")
    env = environment(base, dist.world_size)
    lengths = [e.length for e in encoded]
    per_epoch = len(epoch_batches(len(encoded), lengths, config.batch_size, config.seed, 0))
    metric = PRIMARY_METRIC[spec.task]

    seed_everything(config.seed)
    method.train()
    model = dist.wrap(method)
    optimizer = torch.optim.AdamW(method.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    state = TrainState()
    kind = method.artifact_kind

    def evaluate_now() -> None:
        """Dev evaluation of the current adapter; keeps the best (ties keep the earlier one)."""
        started = time.perf_counter()
        artifact = method.materialize()
        score = _dev_score(base, artifact, dev, spec, config, dist)[metric] if dev else None
        state.eval_seconds += time.perf_counter() - started
        point = state.curve[-1] if state.curve and state.curve[-1]["step"] == state.step else None
        if point is None:
            point = {"step": state.step, "loss": None, "seconds": round(state.train_seconds, 3)}
            state.curve.append(point)
        point[f"dev_{metric}"] = score
        if state.best_metric is None or (score is not None and score > state.best_metric) or not dev:
            state.best_metric, state.best_step, state.bad_evals = score, state.step, 0
            state.best_tensors = {k: v.detach().cpu().clone() for k, v in artifact.tensors().items()}
        else:
            state.bad_evals += 1
        if dev:
            _log(dist, f"step {state.step}: dev {metric} {score:.4f} "
                       f"(best {state.best_metric:.4f} at step {state.best_step})")

    def save_checkpoint() -> None:
        if ckpt is None:
            return
        rngs = dist.gather_objects(rng_state())  # every rank's RNG (a collective: all ranks call this)
        if not dist.is_main:
            return
        atomic_save(
            {"config": asdict(config), "state": asdict(state), "method": method.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs[0],
             "rank_rng": rngs, "world_size": dist.world_size, "environment": env},
            ckpt,
        )

    if resuming:
        saved = dist.broadcast_object(  # our own file: RNG states are not tensors
            torch.load(ckpt, map_location="cpu", weights_only=False) if dist.is_main else None
        )
        if resumable(saved["config"]) != resumable(asdict(config)):
            raise SoftpromptsError(
                f"{ckpt} was written with another training configuration; resume with the same flags")
        method.load_state_dict(saved["method"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(**saved["state"])
        same_world = saved.get("world_size", 1) == dist.world_size and "rank_rng" in saved
        set_rng_state(saved["rank_rng"][dist.rank] if same_world else saved["rng"])
        _log(dist, f"resuming from {ckpt} at step {state.step}")
        changed = environment_changes(saved.get("environment"), env)
        if changed:
            _log(dist, f"warning: resuming in another environment ({'; '.join(changed)}): training continues, but "
                       "the result is not bitwise the one an uninterrupted run gives (same threads, device, dtype "
                       "and library versions are needed for that)")
    else:
        if dev and base_dev is not None:
            if base_dev.get("n", len(dev)) != len(dev):
                raise ValueError(
                    f"base_dev was measured on {base_dev['n']} dev examples, training evaluates {len(dev)}")
            state.base_dev = dict(base_dev)
            _log(dist, f"base model without adapter: dev {metric} {state.base_dev[metric]:.4f} (given)")
        elif dev:
            started = time.perf_counter()
            state.base_dev = _dev_score(base, None, dev, spec, config, dist)
            state.eval_seconds += time.perf_counter() - started
            _log(dist, f"base model without adapter: dev {metric} {state.base_dev[metric]:.4f}")
        evaluate_now()

    loss_fn = compiled_loss() if config.compile else label_loss_sum
    bar = tqdm(total=config.steps, initial=state.step, disable=not (dist.is_main and config.progress), desc="train")
    while state.step < config.steps and not state.stopped_early:
        started = time.perf_counter()
        epoch, index = divmod(state.step, per_epoch)
        global_batch = epoch_batches(len(encoded), lengths, config.batch_size, config.seed, epoch)[index]
        mine = [encoded[i] for i in dist.shard(global_batch)]
        micro = [mine[i :: config.grad_accum] for i in range(config.grad_accum)]
        micro = [m for m in micro if m]
        count = torch.tensor([float(sum(len(e.target_ids) for e in mine))])
        n_tokens = dist.all_reduce_sum(count).item()  # N: target tokens in the whole global batch

        batches = [collate(rows, base.pad_id, base.device) for rows in micro]
        step_tokens = sum(int(batch.attention_mask.sum()) for batch in batches)
        loss_sum = accumulate_step(  # DDP averages over ranks; grad_scale=world size gives the sum
            base, model, kind, batches, n_tokens, grad_scale=float(dist.world_size),
            autocast_dtype=torch.bfloat16 if config.autocast_bf16 else None,
            checkpoint_layers=config.gradient_checkpointing, loss_fn=loss_fn,
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(method.parameters(), config.max_grad_norm or math.inf)
        totals = dist.all_reduce_sum(torch.tensor([loss_sum, float(step_tokens)], dtype=torch.float64))
        kept = str(ckpt) if ckpt is not None and ckpt.is_file() else None
        check_step(state.step + 1, totals[0].item(), grad_norm, config.lr, kept)  # the same on every rank
        step_update(optimizer, state.step + 1, config.lr, kept)
        check_parameters(state.step + 1, method, config.lr, kept)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = totals[0].item() / n_tokens
        state.tokens += int(totals[1].item())  # tokens processed by all ranks
        state.step += 1
        state.train_seconds += time.perf_counter() - started
        state.curve.append({"step": state.step, "loss": round(loss, 6), "seconds": round(state.train_seconds, 3)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{state.tokens / max(state.train_seconds, 1e-9):.0f}")
        last = state.step == config.steps
        if dev and ((config.eval_every and state.step % config.eval_every == 0) or last):
            evaluate_now()
            state.stopped_early = bool(config.patience and state.bad_evals >= config.patience and not last)
            if state.stopped_early:
                _log(dist, f"early stop at step {state.step}: no dev improvement in {config.patience} evaluations")
        elif not dev and last:
            evaluate_now()
        if config.checkpoint_every and state.step % config.checkpoint_every == 0 and not last:
            save_checkpoint()
    bar.close()

    adapter = Adapter.from_method(method, base, task=spec.to_json())
    adapter.artifact = artifact_from_tensors(kind, state.best_tensors).to(base.device, base.dtype)
    record = training_record(config, state, method, spec, report, metric, len(encoded), len(dev), env)
    if state.base_dev is not None and state.best_metric is not None and state.best_metric < state.base_dev[metric]:
        record["below_base_model"] = True
        _log(dist, f"warning: the best adapter (dev {metric} {state.best_metric:.4f}) is below the base model "
                   f"without an adapter ({state.base_dev[metric]:.4f}); train longer (--steps), try another --lr "
                   "or --init, or serve the base model for this task")
    if out_dir is not None and dist.is_main:
        save_adapter(adapter, out_dir, overwrite=True, extra_files={RECORD_FILE: json.dumps(record, indent=2) + "\n"})
        ckpt.unlink(missing_ok=True)
    dist.barrier()
    return TrainResult(adapter=adapter, record=record)


__all__ = ["RECORD_FILE", "TrainResult", "train"]
