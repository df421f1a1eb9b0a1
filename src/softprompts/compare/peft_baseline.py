"""The same four methods through Hugging Face PEFT, on the same model, data, steps, learning rate and batch.

PEFT is an optional dependency (``pip install softprompts[peft]``): it is imported only here, lazily. The mapping
from our method names to PEFT configs is a dict lookup (``PEFT_CONFIGS``); nothing else knows which method runs.

Training mirrors ours: AdamW on PEFT's trainable parameters, answer-only loss (prompt positions labelled -100),
evaluation on the dev set every ``eval_every`` steps and at step 0, the best dev state kept for the test set.
Evaluation goes through PEFT's own paths, as a PEFT user would get them: rank classification scores each label's
verbalization with the PEFT model's forward; generation uses ``PeftModel.generate``. The metric code is shared with
our runs (passed in as ``metrics``).

Failures are detected and reported, never hidden: after training, a few dev prompts are decoded greedily by the
PEFT model and by the bare model; if PEFT's forward changes the logits but its ``generate`` output is identical to
the bare model's, the run is flagged ``generate ignores the adapter`` (PEFT 0.21 prefix tuning on transformers
>= 5.24 does this: its prefix is passed under the deprecated ``past_key_values`` keyword and dropped).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from softprompts.errors import SoftpromptsError
from softprompts.model.base import BaseModel
from softprompts.model.load import resolve


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


def _prompt_config(peft, spec: PeftSpec, tokenizer_path: str | None):
    init = {}
    if spec.init_text and tokenizer_path:  # PEFT's only text init: the same text our run starts from
        init = dict(prompt_tuning_init=peft.PromptTuningInit.TEXT, prompt_tuning_init_text=spec.init_text,
                    tokenizer_name_or_path=tokenizer_path)
    return peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=spec.num_virtual_tokens, **init)


# our method name -> PEFT config builder (a lookup, not branching: DESIGN principle 2)
PEFT_CONFIGS: dict[str, Callable] = {
    "prompt": _prompt_config,
    "ptuning": lambda peft, spec, _tok: peft.PromptEncoderConfig(
        task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=spec.num_virtual_tokens,
        encoder_reparameterization_type="MLP", encoder_hidden_size=spec.hidden_size),
    "prefix": lambda peft, spec, _tok: peft.PrefixTuningConfig(
        task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=spec.num_virtual_tokens,
        prefix_projection=True, encoder_hidden_size=spec.hidden_size),
    "deep": lambda peft, spec, _tok: peft.PrefixTuningConfig(
        task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=spec.num_virtual_tokens, prefix_projection=False),
}


@dataclass
class PeftSpec:
    """One PEFT run: the method (our name), its size, and the training config shared with our run of it.

    ``config`` (a ``train.TrainConfig``) gives steps, learning rate, schedule, warmup, batch size, gradient
    clipping, seed and evaluation interval: the same numbers our loop uses, and the same batches
    (``tasks.epoch_batches``).
    """

    method: str
    num_virtual_tokens: int
    config: object
    init_text: str | None = None
    hidden_size: int = 512  # PEFT's encoder_hidden_size (P-tuning MLP, prefix projection)


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
    issues: list[str] = field(default_factory=list)
    model: object | None = None  # the PeftModel (not serialized)


# --- batches ------------------------------------------------------------------------------------------------------


def _train_batch(base: BaseModel, pairs: Sequence[tuple[list[int], list[int]]], device) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding) ``[B, T]``."""
    width = max(len(p) + len(t) for p, t in pairs)
    pad = base.tokenizer.pad_token_id or 0
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, t) in enumerate(pairs):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(t)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


@torch.no_grad()
def _sequence_logprobs(model, base: BaseModel, pairs: Sequence[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Sum of log p(target tokens | prompt) per pair ``[N]`` through ``model``'s forward (PEFT or bare)."""
    batch = _train_batch(base, pairs, base.device)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    width = batch["input_ids"].shape[1]
    logits = out.logits[:, -width:].float()  # prompt tuning / P-tuning prepend P virtual positions: drop them
    logp = logits[:, :-1].log_softmax(-1)  # predicts tokens 1..T-1
    labels = batch["labels"][:, 1:]
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (picked * (labels != -100)).sum(1)


def rank_classify(model, base: BaseModel, prompts: Sequence[str], label_targets: Sequence[str],
                  max_prompt_tokens: int = 256, batch_size: int = 16) -> list[int]:
    """Index of the best-scoring label verbalization per prompt (sum of target-token log-probabilities)."""
    targets = [base.tokenize(t) for t in label_targets]
    pairs = [(base.tokenize(p)[-max_prompt_tokens:], t) for p in prompts for t in targets]
    scores = []
    for i in range(0, len(pairs), batch_size * len(targets)):
        scores.append(_sequence_logprobs(model, base, pairs[i : i + batch_size * len(targets)]))
    table = torch.cat(scores).view(len(prompts), len(targets))
    return table.argmax(1).tolist()


@torch.no_grad()
def hf_generate(model, base: BaseModel, prompts: Sequence[str], max_new_tokens: int, max_prompt_tokens: int = 256,
                batch_size: int = 8) -> list[str]:
    """Greedy continuations through ``model.generate`` (PEFT or bare), left-padded batches."""
    tok = base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = [base.tokenize(p)[-max_prompt_tokens:] for p in prompts[i : i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=base.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=base.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        out += [tok.decode(g[width:], skip_special_tokens=True) for g in gen]
    return out


# --- the run ------------------------------------------------------------------------------------------------------


EvalFn = Callable[[object, list], dict]  # (model, examples) -> {metric: value}


def make_evaluator(base: BaseModel, spec) -> EvalFn:
    """``(model, examples) -> metrics`` through PEFT's own forward (classify) or ``generate`` (generate).

    Same truncation, label verbalizations and metric code as ``softprompts.evaluate`` (``spec``: a ``TaskSpec``).
    """
    from softprompts.data.datasets import label_targets
    from softprompts.evaluate import score_outputs

    def evaluate(model, examples: list) -> dict:
        prompts = [ex.prompt for ex in examples]
        if spec.task == "classify":
            picks = rank_classify(model, base, prompts, label_targets(spec.template, spec.labels),
                                  spec.max_prompt_tokens)
            return score_outputs(spec, examples, [spec.labels[i] for i in picks])
        return score_outputs(spec, examples, hf_generate(model, base, prompts, spec.max_target_tokens,
                                                         spec.max_prompt_tokens))

    return evaluate


def _detect_issues(peft_model, base: BaseModel, prompts: list[str]) -> list[str]:
    """Check PEFT's ``generate`` against its own forward and the bare model on a few dev prompts.

    For each prompt alone (no padding): the first-step logits of ``generate`` should equal the PEFT forward's last
    logits. If they equal the BARE model's instead while the forward differs, generate ignores the adapter. Then a
    left-padded batch of the same prompts must decode as each prompt alone (padding must not change outputs).
    """
    prompts = prompts[:4]
    if not prompts:
        return []
    ignored = mismatched = no_effect = 0
    for prompt in prompts:
        ids = torch.tensor([base.tokenize(prompt)], device=base.device)
        mask = torch.ones_like(ids)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bare = base.model(input_ids=ids).logits[0, -1].float()
            adapted = peft_model(input_ids=ids, attention_mask=mask).logits[0, -1].float()
            gen = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True,
                                      pad_token_id=base.tokenizer.pad_token_id).logits[0][0].float()
        changes = not torch.allclose(bare, adapted, atol=1e-4, rtol=1e-4)
        no_effect += not changes
        if changes and torch.allclose(gen, bare, atol=1e-4, rtol=1e-4):
            ignored += 1
        elif not torch.allclose(gen, adapted, atol=1e-3, rtol=1e-3):
            mismatched += 1
    issues = []
    if ignored:
        issues.append(
            f"prefix ignored: on {ignored}/{len(prompts)} dev prompts PEFT generate() gives the bare model's logits "
            "although PEFT's forward changes them (its generation metrics are the bare model's)"
        )
    if mismatched:
        issues.append(f"generate() disagrees with PEFT's own forward on {mismatched}/{len(prompts)} dev prompts")
    if no_effect == len(prompts):
        issues.append("adapter has no effect: PEFT's forward logits equal the bare model's")
    if len({len(base.tokenize(p)) for p in prompts}) > 1:  # padding check, only where the bare model is exact
        bare_ok = hf_generate(base.model, base, prompts, 4) == [hf_generate(base.model, base, [p], 4)[0] for p in prompts]
        alone = [hf_generate(peft_model, base, [p], max_new_tokens=4)[0] for p in prompts]
        if bare_ok and hf_generate(peft_model, base, prompts, 4) != alone:
            issues.append("left-padded batched generate() differs from generating each prompt alone "
                          "(the bare model's does not)")
    return issues


def _state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_peft(base: BaseModel, spec: PeftSpec, task, train_examples: list, dev_examples: list, test_examples: list,
             primary: str, out_dir: str | Path | None = None, progress=None) -> PeftResult:
    """Train ``spec.method`` with PEFT on ``base.model`` and evaluate it; the base model is left unchanged.

    ``task``: the ``TaskSpec`` (template, labels, truncation) our runs use; ``primary``: the dev metric to keep the
    best state by.
    """
    from softprompts.tasks import encode, epoch_batches
    from softprompts.train import lr_factor

    evaluate = make_evaluator(base, task)
    peft = import_peft()
    if spec.method not in PEFT_CONFIGS:
        raise SoftpromptsError(f"no PEFT counterpart for method {spec.method!r}; PEFT runs: {', '.join(PEFT_CONFIGS)}")
    path = resolve(base.name)
    tokenizer_path = path if Path(path).is_dir() else None
    torch.manual_seed(spec.config.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = PEFT_CONFIGS[spec.method](peft, spec, tokenizer_path)
        model = peft.get_peft_model(base.model, config)
    result = PeftResult(model=model)
    result.trainable_params = int(model.get_nb_trainable_parameters()[0])
    cfg = spec.config
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    encoded = encode(base, train_examples, task)[0]
    lengths = [e.length for e in encoded]
    per_epoch = len(epoch_batches(len(encoded), lengths, cfg.batch_size, cfg.seed, 0))
    dev = list(dev_examples)[: cfg.eval_limit] if dev_examples else []
    best_state: dict = {}

    def dev_eval(point: dict) -> None:
        model.eval()
        scores = evaluate(model, dev) if dev else {}
        point[f"dev_{primary}"] = scores.get(primary)
        if scores and (not result.best_dev or scores[primary] > result.best_dev[primary]):
            result.best_dev, result.best_step = dict(scores), point["step"]
            best_state.clear()
            best_state.update(_state(model))

    start_point = {"step": 0, "loss": None, "seconds": 0.0}
    result.curve.append(start_point)
    dev_eval(start_point)
    train_seconds, tokens = 0.0, 0
    for step in range(1, cfg.steps + 1):
        model.train()
        started = time.perf_counter()
        epoch, index = divmod(step - 1, per_epoch)
        rows = [encoded[i] for i in epoch_batches(len(encoded), lengths, cfg.batch_size, cfg.seed, epoch)[index]]
        batch = _train_batch(base, [(r.prompt_ids, r.target_ids) for r in rows], base.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = model(**batch).loss  # token mean over the batch's target tokens, as ours
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
        if dev and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            dev_eval(point)
    result.train_seconds = train_seconds
    result.tokens_per_second = tokens / train_seconds if train_seconds > 0 else 0.0
    if not all(math.isfinite(p["loss"]) for p in result.curve[1:]):
        result.issues.append("training diverged: the loss is not finite")
    if best_state:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in best_state:
                    p.copy_(best_state[name])
    model.eval()
    result.test = evaluate(model, test_examples) if test_examples else {}
    result.issues += _detect_issues(model, base, [e.prompt for e in (dev or train_examples)])
    if out_dir is not None:
        result.saved_params, result.saved_bytes = _save(model, Path(out_dir))
    return result


def _save(model, directory: Path) -> tuple[int, int]:
    """``save_pretrained`` into ``directory``; returns (parameters, bytes) of PEFT's saved weights file."""
    from safetensors.torch import load_file

    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(directory))
    weights = directory / "adapter_model.safetensors"
    return sum(t.numel() for t in load_file(str(weights)).values()), weights.stat().st_size


def release(result: PeftResult) -> None:
    """Drop the PEFT wrapper (prompt-learning PEFT never edits the base model's modules)."""
    result.model = None


__all__ = ["PEFT_CONFIGS", "PeftMissingError", "PeftResult", "PeftSpec", "import_peft", "make_evaluator",
           "rank_classify", "hf_generate", "run_peft", "release"]
