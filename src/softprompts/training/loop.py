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
steps; the best adapter is kept and training stops early after ``patience`` evaluations without improvement, or
when the caller's ``on_eval(step, dev metric)`` answers ``True`` (``training/tune.py`` prunes a weak trial so).
Checkpoints (atomic) hold everything needed to continue bitwise: method, optimizer, scheduler and RNG states, the
step (the data order is a pure function of ``(seed, epoch)``), curve and best adapter so far.

``train`` reads top to bottom: the preflight (``preflight.py``: options, output directory, data), ``_Run.start``,
``load_checkpoint`` or ``fresh_start``, the steps (``step`` then ``after_step``: keep-best evaluation, checkpoint),
``finish``. The run's parts, state, checkpoint and record are ``run.Run``'s; when to evaluate, what to keep and when
to stop are ``cadence.py``'s, the rules compare's PEFT loop keeps too. Dev metrics over ranks: ``dev_score``.
With ``config.report_to``, the trackers (``trackers.py``) get each step's loss, learning rate, gradient norm and
tokens/s, each evaluation's dev metrics, and at the end the final ones (main rank only).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from softprompts.adapter import Adapter
from softprompts.adapter_io import save_adapter
from softprompts.evaluate import evaluate
from softprompts.metrics import score_outputs
from softprompts.model.artifacts import artifact_from_tensors
from softprompts.tasks import TaskSpec, collate
from softprompts.training.cadence import Cadence, EvalCallback, lr_schedule
from softprompts.training.config import TrainConfig
from softprompts.training.distributed import Distributed
from softprompts.training.guards import check_parameters, check_step, step_update
from softprompts.training.preflight import TrainData, check_options, log, output_paths, prepare_data
from softprompts.training.run import Run, environment, seed_everything
from softprompts.training.step import accumulate_step, loss_for
from softprompts.training.trackers import RunPlace, Trackers, keep_logs, run_place

RECORD_FILE = "training.json"


@dataclass
class TrainResult:
    adapter: Adapter  # the best adapter on dev (the last one without dev data)
    record: dict  # what training.json holds


# --- the run's steps: a ``run.Run`` (its parts, state, checkpoint and record) that trains ------------------------


class _Run(Run):
    """One training run (``run.Run``: the parts, the state, checkpoint and record) with the loop's steps,
    evaluations and trackers."""

    @classmethod
    def start(cls, base, method, spec: TaskSpec, config: TrainConfig, dist: Distributed, data: TrainData,
              ckpt: Path | None, on_eval: EvalCallback | None = None) -> _Run:
        """Seed the global RNGs, put the method in training mode, wrap it for DDP, make AdamW and its schedule."""
        env = environment(base, dist.world_size)
        seed_everything(config.seed)
        method.train()
        model = dist.wrap(method)
        optimizer = torch.optim.AdamW(method.parameter_groups(config.lr), weight_decay=config.weight_decay)
        scheduler = lr_schedule(optimizer, config)
        return cls(base, method, spec, config, dist, data, ckpt, env, model, optimizer, scheduler, on_eval=on_eval)

    # --- a fresh start: score the base model and the initial adapter (a resume: ``Run.load_checkpoint``) -------

    def fresh_start(self, base_dev: dict | None) -> None:
        """The bare model's dev metrics (given by the caller, or measured once), then the step-0 evaluation, so the
        kept adapter is never worse on dev than its init."""
        dev, state, metric = self.data.dev, self.state, self.metric
        if dev and base_dev is not None:
            if base_dev.get("n", len(dev)) != len(dev):
                raise ValueError(
                    f"base_dev was measured on {base_dev['n']} dev examples, training evaluates {len(dev)}")
            state.base_dev = dict(base_dev)
            log(self.dist, f"base model without adapter: dev {metric} {state.base_dev[metric]:.4f} (given)")
        elif dev:
            started = time.perf_counter()
            state.base_dev = dev_score(self.base, None, dev, self.spec, self.config, self.dist)
            state.eval_seconds += time.perf_counter() - started
            log(self.dist, f"base model without adapter: dev {metric} {state.base_dev[metric]:.4f}")
        if state.base_dev is not None:
            self.trackers.log(0, {f"base_dev/{k}": v for k, v in state.base_dev.items()})
        self.evaluate_now()

    def open_trackers(self, place: RunPlace | None, resuming: bool) -> None:
        """The trackers of ``config.report_to`` (main rank; resumed: the checkpoint's runs), given the configuration
        and the adapter's sizes; their run ids go in the state, so checkpoints keep them."""
        state, method = self.state, self.method
        self.trackers = Trackers.open(self.config, place, state.step if resuming else None, state.tracker_runs,
                                      self.dist.is_main)
        state.tracker_runs = {**state.tracker_runs, **self.trackers.run_ids}
        if not self.trackers.trackers:
            return
        devices = [self.base.device] if self.base.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # its size, the run's RNG untouched
            artifact = method.materialize()
        config = {"train": asdict(self.config), "method": method.config.to_json(), "task": self.spec.to_json(),
                  "environment": self.env}
        params = {"method": method.name, "artifact": method.artifact_kind,
                  "virtual_tokens": method.config.num_virtual_tokens, "trainable_parameters": method.num_trainable(),
                  "adapter_parameters": artifact.num_parameters(), "train_examples": len(self.data.encoded),
                  "dev_examples": len(self.data.dev)}
        self.trackers.start(config, params)

    # --- the steps ---------------------------------------------------------------------------------------------

    def run_steps(self) -> None:
        """Optimizer steps until ``config.steps`` or an early stop, each followed by its evaluation and checkpoint."""
        config = self.config
        loss_fn = loss_for(config)
        bar = tqdm(total=config.steps, initial=self.state.step, disable=not (self.dist.is_main and config.progress),
                   desc="train")
        while self.state.step < config.steps and not self.state.stopped_early:
            loss = self.step(loss_fn)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}",
                            tok_s=f"{self.state.tokens / max(self.state.train_seconds, 1e-9):.0f}")
            self.after_step()
        bar.close()

    def step(self, loss_fn: Callable) -> float:
        """One optimizer step over the next global batch; returns its token-mean loss (the same on every rank).

        Gradients (``accumulate_step``: DDP averages over ranks, ``grad_scale`` = world size gives the sum), clipping,
        the non-finite guards, the update and the schedule; the step's loss and time go on the curve.
        """
        config, state, dist = self.config, self.state, self.dist
        started = time.perf_counter()
        batches, n_tokens = self._micro_batches()
        step_tokens = sum(int(batch.attention_mask.sum()) for batch in batches)
        loss_sum = accumulate_step(
            self.base, self.model, self.method.artifact_kind, batches, n_tokens, grad_scale=float(dist.world_size),
            autocast_dtype=torch.bfloat16 if config.autocast_bf16 else None,
            checkpoint_layers=config.gradient_checkpointing, loss_fn=loss_fn,
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(self.method.parameters(), config.max_grad_norm or math.inf)
        totals = dist.all_reduce_sum(torch.tensor([loss_sum, float(step_tokens)], dtype=torch.float64))
        lr = self.scheduler.get_last_lr()[0]  # this step's
        self._update(totals[0].item(), grad_norm)
        loss = totals[0].item() / n_tokens
        state.tokens += int(totals[1].item())  # tokens processed by all ranks
        state.step += 1
        state.train_seconds += time.perf_counter() - started
        state.curve.append({"step": state.step, "loss": round(loss, 6), "seconds": round(state.train_seconds, 3)})
        self.trackers.log(state.step, {"train/loss": state.curve[-1]["loss"], "train/lr": lr,
                                       "train/grad_norm": grad_norm.item(),
                                       "train/tokens_per_second": state.tokens / max(state.train_seconds, 1e-9)})
        return loss

    def _micro_batches(self) -> tuple[list, float]:
        """This rank's micro-batches of the step's global batch (collated on the model's device) and ``N``, the
        target tokens of the whole global batch (all-reduced over ranks)."""
        config, data = self.config, self.data
        mine = [data.encoded[i] for i in self.dist.shard(data.global_batch(self.state.step, config))]
        micro = [mine[i :: config.grad_accum] for i in range(config.grad_accum)]
        micro = [m for m in micro if m]
        count = torch.tensor([float(sum(len(e.target_ids) for e in mine))])
        n_tokens = self.dist.all_reduce_sum(count).item()  # N: target tokens in the whole global batch
        return [collate(rows, self.base.pad_id, self.base.device) for rows in micro], n_tokens

    def _update(self, loss_sum: float, grad_norm: torch.Tensor) -> None:
        """The guarded update: stop on a non-finite loss, gradient or parameter (naming the checkpoint kept), else
        step the optimizer and the schedule."""
        step, lr = self.state.step + 1, self.config.lr
        kept = str(self.ckpt) if self.ckpt is not None and self.ckpt.is_file() else None
        check_step(step, loss_sum, grad_norm, lr, kept)  # the same on every rank
        step_update(self.optimizer, step, lr, kept)
        check_parameters(step, self.method, lr, kept)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def after_step(self) -> None:
        """Dev evaluation every ``eval_every`` steps and at the last one (patience or ``on_eval`` may stop early;
        without dev the last adapter is the one kept), then a checkpoint every ``checkpoint_every`` steps before the
        last."""
        config, state, dist = self.config, self.state, self.dist
        cadence, last = Cadence.of(config), state.step == config.steps
        if self.data.dev and cadence.evaluates(state.step):
            score = self.evaluate_now()
            stop = cadence.stop(state.step, score, state, self.on_eval)
            state.stopped_early = stop is not None
            if stop == "asked":
                log(dist, f"stopped at step {state.step}: the caller's on_eval asked to stop")
            elif stop == "patience":
                log(dist, f"early stop at step {state.step}: no dev improvement in {config.patience} evaluations")
        elif not self.data.dev and last:
            self.evaluate_now()
        if config.checkpoint_every and state.step % config.checkpoint_every == 0 and not last:
            self.save_checkpoint()

    # --- keep-best evaluation ----------------------------------------------------------------------------------

    def evaluate_now(self) -> float | None:
        """Dev evaluation of the current adapter (its primary metric, ``None`` without dev); keeps the best
        (``cadence.KeepBest``, which the state is: ties keep the earlier one, without dev the last)."""
        state, dev, metric = self.state, self.data.dev, self.metric
        started = time.perf_counter()
        artifact = self.method.materialize()
        scores = dev_score(self.base, artifact, dev, self.spec, self.config, self.dist) if dev else {}
        score = scores[metric] if dev else None
        state.eval_seconds += time.perf_counter() - started
        self.trackers.log(state.step, {f"dev/{k}": v for k, v in scores.items()})
        point = state.curve[-1] if state.curve and state.curve[-1]["step"] == state.step else None
        if point is None:
            point = {"step": state.step, "loss": None, "seconds": round(state.train_seconds, 3)}
            state.curve.append(point)
        point[f"dev_{metric}"] = score
        state.offer(state.step, score, lambda: {k: v.detach().cpu().clone() for k, v in artifact.tensors().items()})
        if dev:
            log(self.dist, f"step {state.step}: dev {metric} {score:.4f} "
                           f"(best {state.best_metric:.4f} at step {state.best_step})")
        return score

    # --- the result --------------------------------------------------------------------------------------------

    def finish(self, out_dir: Path | None, extra_files: dict[str, str] | None = None) -> TrainResult:
        """The best adapter and the training record; with ``out_dir`` the main rank writes both (and
        ``extra_files``) and removes the checkpoint."""
        state, base = self.state, self.base
        adapter = Adapter.from_method(self.method, base, task=self.spec)
        adapter.artifact = artifact_from_tensors(self.method.artifact_kind, state.best_tensors).to(base.device,
                                                                                                   base.dtype)
        record = self.record()
        self.trackers.finish(_final(record))
        if out_dir is not None and self.dist.is_main:
            files = {RECORD_FILE: json.dumps(record, indent=2) + "\n", **(extra_files or {})}
            keep_logs(out_dir, lambda: save_adapter(adapter, out_dir, overwrite=True, extra_files=files))
            self.ckpt.unlink(missing_ok=True)
        self.dist.barrier()
        return TrainResult(adapter=adapter, record=record)


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
    extra_files: dict[str, str] | None = None,
    on_eval: EvalCallback | None = None,
) -> TrainResult:
    """Train ``method`` (a ``PromptMethod`` built on ``base``) and return the best adapter and the training record.

    With ``out_dir`` the adapter, ``training.json`` and (during training) ``OUT.checkpoint.pt`` are written by the
    main rank; ``resume`` continues from that checkpoint. ``base_dev``: the bare model's metrics on the same dev
    examples (the first ``eval_limit``) when the caller has them already (``compare`` and ``demo`` train several
    methods on one dev set); otherwise they are computed once before training. ``extra_files``: name -> text,
    written into ``out_dir`` with the adapter (a cartridge's self-study conversations). ``on_eval(step, metric)``:
    called after each dev evaluation that follows a step (on every rank: it must answer the same on all); ``True``
    stops training there (not at the last step), keeping the best adapter so far, as patience does.
    """
    check_options(base, config)
    dist = dist or Distributed()
    out_dir, ckpt, resuming = output_paths(out_dir, resume, overwrite, dist)
    place = run_place(config, out_dir)
    data = prepare_data(base, method, train_examples, dev_examples, spec, config, dist)
    run = _Run.start(base, method, spec, config, dist, data, ckpt, on_eval)
    if resuming:
        run.load_checkpoint()
    try:
        run.open_trackers(place, resuming)
        if not resuming:
            run.fresh_start(base_dev)
        run.run_steps()
        return run.finish(out_dir, extra_files)
    finally:
        run.trackers.finish(None)  # stopped on an error: flushed and marked failed (a no-op after finish)


def dev_score(base, artifact, dev, spec: TaskSpec, config: TrainConfig, dist: Distributed) -> dict:
    """Dev metrics of ``artifact`` (``None``: the bare model), identical on every rank: each rank evaluates its shard
    (rank ``r``: examples ``r, r + N, ...``; possibly none), the outputs are merged back in dev order and the task's
    metrics computed from the whole set."""
    mine = dist.shard(dev)
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


def _final(record: dict) -> dict:
    """What the trackers get at the end, from ``training.json``."""
    timings = record["timings"]
    return {"best_dev": record["best_dev"], "best_step": record["best_step"], "steps_done": record["steps_done"],
            "stopped_early": int(record["stopped_early"]), "train_seconds": timings["train_seconds"],
            "tokens_per_second": timings["tokens_per_second"]}


__all__ = ["RECORD_FILE", "EvalCallback", "TrainResult", "dev_score", "merge", "train"]
