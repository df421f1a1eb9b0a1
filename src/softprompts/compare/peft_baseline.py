"""The same four methods through Hugging Face PEFT, on the same model, data, steps, learning rate and batch.

PEFT is an optional dependency (``pip install softprompts[peft]``): it is imported only here, lazily. Which PEFT
config a method maps to is declared by the method itself (``peft_type`` and ``peft_options`` in its file in
``methods/``); ``peft_config`` only looks the PEFT class up (``PEFT_CONFIG_CLASSES``).

Training mirrors ours: AdamW on PEFT's trainable parameters, answer-only loss (prompt positions labelled -100), and
our loop's own rules (``training/cadence.py``): the learning-rate schedule, evaluation on the dev set at step 0, every
``eval_every`` steps and at the last, the best dev state kept for the test set (ties keep the earlier), the early stop
(``on_eval``, ``patience``).
Evaluation goes through PEFT's own paths, as a PEFT user would get them: rank classification scores each label's
verbalization with the PEFT model's forward; generation uses ``PeftModel.generate`` (and PEFT's forward for the
references' perplexity). The metric code is shared with our runs (``metrics.score_outputs``).

LoRA (``LORA``) runs beside them as the ceiling: a weight adapter, PEFT's ``LoraConfig`` with ``LORA_OPTIONS`` (rank 8
on every linear layer of the decoder: attention and MLP projections), trained the same way on the same batches with
its own learning rate ``LORA_LR`` (``compare --tune`` searches lr and the rank ``r``; ``lora_alpha = 2 r`` keeps the
update's scale ``alpha / r`` what it is at rank 8). LoRA edits the model's modules in place; ``release`` takes them out
again (``unload``), so the base is the same model for every run after it.

Failures are detected and reported, never hidden: after training, a few dev prompts are decoded greedily by the
PEFT model and by the bare model; if PEFT's forward changes the logits but its ``generate`` output is identical to
the bare model's, the run is flagged ``generate ignores the adapter`` (PEFT 0.21 prefix tuning on transformers
>= 5.24 does this: its prefix is passed under the deprecated ``past_key_values`` keyword and dropped).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from softprompts.compare.config import CompareData
from softprompts.compare.peft_eval import EvalFn, detect_issues, make_evaluator, peft_pair, train_batch
from softprompts.errors import SoftpromptsError
from softprompts.methods import MethodConfig, method_class
from softprompts.metrics import PRIMARY_METRIC
from softprompts.model.decoder import BaseModel
from softprompts.model.load import resolve
from softprompts.tasks import encode, epoch_batches
from softprompts.training import TrainConfig
from softprompts.training.cadence import Cadence, EvalCallback, KeepBest, lr_schedule


class PeftMissingError(SoftpromptsError):
    """``--baseline peft`` without the peft package."""


def import_peft():
    """The ``peft`` module, or a one-line error saying how to install it."""
    try:
        import peft
    except ModuleNotFoundError:
        raise PeftMissingError(
            "--baseline peft needs Hugging Face PEFT, an optional dependency: pip install 'softprompts[peft]' "
            "(or pip install peft)"
        ) from None
    return peft


# PEFT's config class per PEFT type; each of our methods names its PEFT type and options (methods/*.py)
PEFT_CONFIG_CLASSES = {"PROMPT_TUNING": "PromptTuningConfig", "P_TUNING": "PromptEncoderConfig",
                       "PREFIX_TUNING": "PrefixTuningConfig"}


LORA = "lora"
LORA_OPTIONS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
LORA_LR = 3e-4  # docs/RESULTS.md section 5: the best dev accuracy of 3e-4 / 1e-3 / 3e-3 at 60 steps on mr


@dataclass
class PeftSpec:
    """One PEFT run: the method (our name), our method config (size, encoder, init) and the training config shared
    with our run of it.

    ``config`` (a ``training.TrainConfig``) gives steps, learning rate, schedule, warmup, batch size, gradient
    clipping, seed and evaluation interval: the same numbers our loop uses, and the same batches
    (``tasks.epoch_batches``). ``init_text``: the text our run starts from (``None`` for another init).
    """

    method: str
    method_config: MethodConfig | None  # None for LoRA (no method of ours)
    config: TrainConfig
    init_text: str | None = None
    hidden_size: int = 512  # the base model's hidden size (PEFT encoder widths default to it)
    lora_rank: int = LORA_OPTIONS["r"]  # LoRA's r (lora_alpha = 2 r: the scale alpha / r stays 2)


def peft_config(peft, spec: PeftSpec, tokenizer_path: str | None):
    """The PEFT config of our method's counterpart (``peft_type`` and ``peft_options`` on the method class), or
    LoRA's."""
    if spec.method == LORA:
        options = {**LORA_OPTIONS, "r": spec.lora_rank, "lora_alpha": 2 * spec.lora_rank}
        return peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, **options)
    cls = method_class(spec.method)
    if cls.peft_type is None:
        raise SoftpromptsError(f"method {spec.method!r} has no PEFT counterpart")
    options = cls.peft_options(spec.method_config, spec.hidden_size, spec.init_text, tokenizer_path)
    config_class = getattr(peft, PEFT_CONFIG_CLASSES[cls.peft_type])
    return config_class(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=spec.method_config.num_virtual_tokens,
                        **options)


@dataclass
class PeftResult:
    """What a PEFT run measured; ``issues`` lists detected failures in plain words."""

    curve: list[dict] = field(default_factory=list)
    best_dev: dict = field(default_factory=dict)
    best_step: int = 0
    test: dict = field(default_factory=dict)
    trainable_params: int = 0
    saved_params: int = 0
    saved_bytes: int = 0
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0
    steps_done: int = 0
    stopped_early: bool = False  # on_eval asked to stop before the last step, or patience ran out
    issues: list[str] = field(default_factory=list)
    model: object | None = None  # the PeftModel (not serialized)


# --- the run ------------------------------------------------------------------------------------------------------


@dataclass
class _PeftLoop:
    """PEFT's model trained on our batches (``tasks.epoch_batches``) by our loop's rules (``training/cadence.py``):
    the schedule, when dev is evaluated, the best state kept (``keep``: PEFT's trainable tensors by name) and the
    early stop. ``result`` collects the curve, the best dev metrics and the counts."""

    base: BaseModel
    model: object  # the PeftModel
    config: TrainConfig
    evaluate: EvalFn  # peft_eval.make_evaluator's (model, examples) -> metrics
    dev: list
    primary: str
    result: PeftResult
    keep: KeepBest = field(default_factory=KeepBest)

    def run(self, train_examples: list, task, progress=None, on_eval: EvalCallback | None = None) -> None:
        """The step-0 evaluation, then ``config.steps`` optimizer steps (or fewer: an early stop), each evaluated on
        dev when ``Cadence.evaluates`` says so; the best state is put back into the model at the end."""
        cfg, result, cadence = self.config, self.result, Cadence.of(self.config)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = lr_schedule(optimizer, cfg)
        encoded = encode(self.base, train_examples, task)[0]
        lengths = [e.length for e in encoded]
        per_epoch = len(epoch_batches(len(encoded), lengths, cfg.batch_size, cfg.seed, 0))
        start_point = {"step": 0, "loss": None, "seconds": 0.0}
        result.curve.append(start_point)
        self.evaluate_dev(start_point)
        train_seconds, tokens = 0.0, 0
        for step in range(1, cfg.steps + 1):
            self.model.train()
            started = time.perf_counter()
            epoch, index = divmod(step - 1, per_epoch)
            rows = [encoded[i] for i in epoch_batches(len(encoded), lengths, cfg.batch_size, cfg.seed, epoch)[index]]
            batch = train_batch(self.base, [peft_pair(r) for r in rows], self.base.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = self.model(**batch).loss  # token mean over the batch's target tokens, as ours
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - started
            tokens += int(batch["attention_mask"].sum())
            result.steps_done = step
            point = {"step": step, "loss": round(loss.item(), 6), "seconds": round(train_seconds, 3)}
            result.curve.append(point)
            if progress is not None:
                progress.update(1)
            if self.dev and cadence.evaluates(step):
                self.evaluate_dev(point)
                if cadence.stop(step, point[f"dev_{self.primary}"], self.keep, on_eval) is not None:
                    result.stopped_early = True
                    break
        result.train_seconds = train_seconds
        result.tokens_per_second = tokens / train_seconds if train_seconds > 0 else 0.0
        self.restore_best()

    def evaluate_dev(self, point: dict) -> None:
        """The dev metrics of the model now, on the curve's ``point``; kept as the best when they improve."""
        self.model.eval()
        scores = self.evaluate(self.model, self.dev) if self.dev else {}
        point[f"dev_{self.primary}"] = scores.get(self.primary)
        if scores and self.keep.offer(point["step"], scores[self.primary], lambda: _state(self.model)):
            self.result.best_dev, self.result.best_step = dict(scores), point["step"]

    def restore_best(self) -> None:
        """The kept state back into the model (without dev: the last state stays)."""
        if self.keep.best_tensors:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    if name in self.keep.best_tensors:
                        p.copy_(self.keep.best_tensors[name])


def _state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_peft(base: BaseModel, spec: PeftSpec, data: CompareData, out_dir: str | Path | None = None, progress=None,
             on_eval: EvalCallback | None = None) -> PeftResult:
    """Train ``spec.method`` with PEFT on ``base.model`` and evaluate it; the base model is left unchanged.

    ``data``: the ``TaskSpec`` our runs use (``data.spec``: template, labels, truncation) and the splits: trained on
    ``train``, the best state kept by the task's primary dev metric on ``dev`` (its first ``eval_limit`` examples),
    measured on ``test`` (may be empty). ``on_eval(step, dev metric)``: called after each dev evaluation past step
    0, as our loop's ``train(on_eval=)``; ``True`` stops training there with the best state so far
    (``stopped_early``).
    """
    task = data.spec
    evaluate = make_evaluator(base, task)
    peft = import_peft()
    path = resolve(base.name)
    tokenizer_path = path if Path(path).is_dir() else None
    torch.manual_seed(spec.config.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft_config(peft, spec, tokenizer_path)
        model = peft.get_peft_model(base.model, config)
    result = PeftResult(model=model)
    with _released_on_error(result, base):  # a run that fails mid-way leaves no LoRA layer in the base
        result.trainable_params = int(model.get_nb_trainable_parameters()[0])
        dev = list(data.dev)[: spec.config.eval_limit] if data.dev else []
        _PeftLoop(base, model, spec.config, evaluate, dev, PRIMARY_METRIC[task.task], result).run(
            data.train, task, progress, on_eval)
        if not all(math.isfinite(p["loss"]) for p in result.curve[1:]):
            result.issues.append("training diverged: the loss is not finite")
        model.eval()
        result.test = evaluate(model, data.test) if data.test else {}
        result.issues += detect_issues(model, base, [e.prompt for e in (dev or data.train)])
        if out_dir is not None:
            result.saved_params, result.saved_bytes = _save(model, Path(out_dir))
    return result


def _save(model, directory: Path) -> tuple[int, int]:
    """``save_pretrained`` into ``directory``; returns (parameters, bytes) of PEFT's saved weights file."""
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(directory))
    weights = directory / "adapter_model.safetensors"
    return sum(t.numel() for t in load_file(str(weights)).values()), weights.stat().st_size


def _is_lora(model) -> bool:
    config = model.peft_config.get(model.active_adapter)
    kind = getattr(config, "peft_type", None)
    return getattr(kind, "value", kind) == "LORA"


@contextlib.contextmanager
def _released_on_error(result: PeftResult, base: BaseModel) -> Iterator[None]:
    """``release`` the PEFT wrapper when the block raises (then re-raise): a LoRA run that fails must not leave its
    layers in the base model that the runs after it use."""
    try:
        yield
    except BaseException:
        release(result, base)
        raise


def release(result: PeftResult, base: BaseModel | None = None) -> None:
    """Drop the PEFT wrapper; a LoRA wrapper's layers are taken out of the base model first (``unload``: the
    original modules back, unmerged), and the base is frozen in eval mode again."""
    model, result.model = result.model, None
    if model is not None and _is_lora(model):
        model.base_model.unload()  # LoraModel.unload: every LoRA layer replaced by the module it wrapped
    if base is not None:
        base.model.eval()
        for p in base.model.parameters():
            p.requires_grad_(False)


__all__ = ["LORA", "LORA_LR", "LORA_OPTIONS", "PEFT_CONFIG_CLASSES", "PeftMissingError", "PeftResult", "PeftSpec",
           "import_peft", "peft_config", "release", "run_peft"]
