"""PEFT models evaluated the way a PEFT user gets them, and the checks that catch PEFT failures.

Batches: right-padded ``input_ids``/``attention_mask``/``labels`` (labels -100 on prompt and padding), as HF's
Trainer builds them. Rank classification scores each label verbalization with the model's forward:
``score(y) = sum_t log p(y_t | prompt, y_<t)`` over the target tokens. Generation goes through ``model.generate``
(greedy, left-padded batches). ``detect_issues`` compares PEFT's ``generate`` with its own forward and with the bare
model on a few dev prompts.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence

import torch

from softprompts.data.datasets import label_targets
from softprompts.data.templates import VIRTUAL
from softprompts.metrics import score_outputs
from softprompts.model.frozen import FrozenBase
from softprompts.model.padding import pad_rows
from softprompts.tasks import encode, split_prompt

# --- batches ------------------------------------------------------------------------------------------------------


def prompt_ids(base: FrozenBase, prompt: str, max_prompt_tokens: int | None = None) -> list[int]:
    """A prompt's token ids as ours reads them (``tasks.split_prompt``): the base's BOS first when its tokenizer adds
    one, then the text's last ``max_prompt_tokens`` tokens. PEFT's rows must start as ours do, or a BOS-reading base
    (Gemma) is scored without its BOS and the bare model under PEFT is not the bare model of our rows."""
    lead, ids = split_prompt(base, prompt)
    return [*lead, *(ids[-max_prompt_tokens:] if max_prompt_tokens else ids)]


def train_batch(base: FrozenBase, pairs: Sequence[tuple[list[int], list[int]]], device) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding) ``[B, T]``."""
    ids, mask = pad_rows([p + t for p, t in pairs], base.pad_id, device, side="right")
    labels, _ = pad_rows([[-100] * len(p) + t for p, t in pairs], -100, device, side="right")
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def _sequence_logprobs(model, base: FrozenBase, pairs: Sequence[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Sum of log p(target tokens | prompt) per pair ``[N]`` through ``model``'s forward (PEFT or bare)."""
    batch = train_batch(base, pairs, base.device)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    width = batch["input_ids"].shape[1]
    logits = out.logits[:, -width:].float()  # prompt tuning / P-tuning prepend P virtual positions: drop them
    logp = logits[:, :-1].log_softmax(-1)  # predicts tokens 1..T-1
    labels = batch["labels"][:, 1:]
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (picked * (labels != -100)).sum(1)


def rank_classify(model, base: FrozenBase, prompts: Sequence[str], label_targets: Sequence[str],
                  max_prompt_tokens: int = 256, batch_size: int = 16) -> list[int]:
    """Index of the best-scoring label verbalization per prompt (sum of target-token log-probabilities)."""
    targets = [base.tokenize(t) for t in label_targets]
    pairs = [(prompt_ids(base, p, max_prompt_tokens), t) for p in prompts for t in targets]
    scores = []
    for i in range(0, len(pairs), batch_size * len(targets)):
        scores.append(_sequence_logprobs(model, base, pairs[i : i + batch_size * len(targets)]))
    table = torch.cat(scores).view(len(prompts), len(targets))
    return table.argmax(1).tolist()


@torch.no_grad()
def hf_generate(model, base: FrozenBase, prompts: Sequence[str], max_new_tokens: int, max_prompt_tokens: int = 256,
                batch_size: int = 8) -> list[str]:
    """Greedy continuations through ``model.generate`` (PEFT or bare), left-padded batches."""
    tok, pad = base.tokenizer, base.pad_id
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = [prompt_ids(base, p, max_prompt_tokens) for p in prompts[i : i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=base.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=base.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        out += [tok.decode(g[width:], skip_special_tokens=True) for g in gen]
    return out


def peft_pair(row) -> tuple[list[int], list[int]]:
    """``(prompt ids, target ids)`` of an encoded row as PEFT reads it: the placement's lead is plain text there
    (PEFT puts its virtual tokens in front of everything)."""
    return list(row.lead_ids) + row.prompt_ids, row.target_ids


def reference_logprobs(model, base: FrozenBase, examples: list, spec, batch_size: int = 16) -> list[tuple[float, int]]:
    """Per example ``(log p(target | prompt), target tokens)`` through ``model``'s forward, cut as training cuts."""
    pairs = [peft_pair(e) for e in encode(base, examples, spec)[0]]
    sums = [_sequence_logprobs(model, base, pairs[i : i + batch_size]) for i in range(0, len(pairs), batch_size)]
    return [(float(lp), len(t)) for lp, (_, t) in zip(torch.cat(sums).tolist(), pairs, strict=True)]


# --- evaluation through PEFT's own paths -------------------------------------------------------------------


EvalFn = Callable[[object, list], dict]  # (model, examples) -> {metric: value}


def make_evaluator(base: FrozenBase, spec) -> EvalFn:
    """``(model, examples) -> metrics`` through PEFT's own forward (classify, and the references' perplexity) or
    ``generate`` (generated texts).

    Same truncation, label verbalizations and metric code as ``softprompts.evaluate`` (``spec``: a ``TaskSpec``).
    """
    def evaluate(model, examples: list) -> dict:
        prompts = [ex.prompt.replace(VIRTUAL, "") for ex in examples]  # PEFT has no placement: tokens first
        if spec.task == "classify":
            picks = rank_classify(model, base, prompts, label_targets(spec.prompt_format(base.tokenizer), spec.labels),
                                  spec.max_prompt_tokens)
            return score_outputs(spec, examples, [spec.labels[i] for i in picks])
        texts = hf_generate(model, base, prompts, spec.max_target_tokens, spec.max_prompt_tokens)
        return score_outputs(spec, examples, texts, reference_logprobs(model, base, examples, spec))

    return evaluate


def bare_model(peft_model):
    """A context in which ``base.model`` is the bare model again: LoRA lives inside the base's own modules, so its
    layers must be switched off (``disable_adapter``); prompt-learning PEFT never touches them."""
    return peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else contextlib.nullcontext()


def detect_issues(peft_model, base: FrozenBase, prompts: list[str]) -> list[str]:
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
        ids = torch.tensor([prompt_ids(base, prompt)], device=base.device)
        mask = torch.ones_like(ids)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with bare_model(peft_model):
                bare = base.model(input_ids=ids).logits[0, -1].float()
            adapted = peft_model(input_ids=ids, attention_mask=mask).logits[0, -1].float()
            gen = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True,
                                      pad_token_id=base.pad_id).logits[0][0].float()
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
    if len({len(prompt_ids(base, p)) for p in prompts}) > 1:  # padding check, only where the bare model is exact
        with bare_model(peft_model):
            alone_bare = [hf_generate(base.model, base, [p], 4)[0] for p in prompts]
            bare_ok = hf_generate(base.model, base, prompts, 4) == alone_bare
        alone = [hf_generate(peft_model, base, [p], max_new_tokens=4)[0] for p in prompts]
        if bare_ok and hf_generate(peft_model, base, prompts, 4) != alone:
            issues.append("left-padded batched generate() differs from generating each prompt alone "
                          "(the bare model's does not)")
    return issues


__all__ = ["EvalFn", "bare_model", "detect_issues", "hf_generate", "make_evaluator", "prompt_ids", "rank_classify",
           "reference_logprobs", "train_batch"]
