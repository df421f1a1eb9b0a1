"""Evaluate an adapter (or the bare model) on task examples: run the model, then score with ``metrics.py``.

classify — rank classification, exact and without free generation: for every label ``c`` with verbalization tokens
``y^c = (y^c_1..y^c_n)`` (the target template rendered with ``c``)::

    score(c | x) = sum_j log p(y^c_j | context, x, y^c_<j)        prediction = argmax_c score(c | x)

When every verbalization is one token a single forward per example gives all scores (the same numbers, ``C`` times
cheaper).

generate — greedy decoding with the adapter (``model/decode.py``), and the log-likelihood of each reference target
under teacher forcing (the same sum as above with the target's tokens, for the perplexity).

A soft prompt is turned into the exact KV prefix it produces once (``BaseModel.soft_prompt_to_kv``) before
evaluating: the same outputs, without re-running the P virtual positions in every batch. On an encoder-decoder base
(T5, BART) the encoder reads the prompt and the decoder writes each verbalization / target, its end-of-sequence token
included (``model/encoder_decoder_score.py``); soft prompts stay soft prompts there (no fixed KV in a bidirectional
encoder).
"""

from __future__ import annotations

import torch

from softprompts.data.datasets import Example, label_targets
from softprompts.metrics import score_outputs
from softprompts.model import encoder_decoder_score
from softprompts.model.artifacts import Artifact, SoftPrompt
from softprompts.model.decode import generate_ids
from softprompts.model.generation import GREEDY, Sampling, eos_ids
from softprompts.model.inject import VirtualContext, forward
from softprompts.model.placement import place
from softprompts.tasks import Encoded, TaskSpec, collate, encode, length_sorted_chunks, prompt_ids, split_prompt


def serving_artifact(base, artifact) -> Artifact | None:
    """Accepts an Adapter, an artifact or None; soft prompts become their (exactly equal) KV prefix."""
    artifact = getattr(artifact, "artifact", artifact)
    if artifact is None:
        return None
    artifact = artifact.to(base.device, base.dtype)
    if base.is_encoder_decoder:  # a soft prompt in front of a bidirectional encoder has no fixed KV
        return artifact
    return base.soft_prompt_to_kv(artifact) if isinstance(artifact, SoftPrompt) else artifact


def _row_artifacts(base, artifact, leads=None):
    """What rows run with: ``serving_artifact`` of a shared artifact, or a list with one per row (``artifact`` a
    per-row list, or per-row ``leads``): each distinct (artifact, lead) placed after its lead (placement) and put in
    its serving form once."""
    if not leads or not any(leads):
        if not isinstance(artifact, list):
            return serving_artifact(base, artifact)
        leads = [()] * len(artifact)
    rows = artifact if isinstance(artifact, list) else [artifact] * len(leads)
    done: dict[tuple, Artifact | None] = {}
    out = []
    for a, lead in zip(rows, leads, strict=True):
        key = (id(a), tuple(lead))
        if key not in done:
            raw = getattr(a, "artifact", a)
            raw = raw.to(base.device, base.dtype) if raw is not None else None
            done[key] = serving_artifact(base, place(base, raw, lead))
        out.append(done[key])
    return out


def _context(artifacts, rows: list[int]):
    """What ``forward`` takes for batch ``rows``: the shared artifact, or the rows' own ones as a ``VirtualContext``."""
    return VirtualContext.from_rows([artifacts[i] for i in rows]) if isinstance(artifacts, list) else artifacts


@torch.no_grad()
def label_scores(base, artifact, prompts: list[list[int]], verbalizations: list[list[int]], batch_size: int = 16):
    """``[N, C]`` sum of log-probabilities of each label's tokens after each prompt. ``artifact``: one for every
    prompt, or a list with one per prompt."""
    if not prompts:
        return torch.zeros(0, len(verbalizations))
    return torch.stack(row_label_scores(base, artifact, prompts, [verbalizations] * len(prompts), batch_size))


@torch.no_grad()
def row_label_scores(
    base, artifact, prompts: list[list[int]], verbalizations: list[list[list[int]]], batch_size: int = 16
) -> list[torch.Tensor]:
    """Per prompt ``i`` a ``[C_i]`` tensor: the log-probability of each of ``verbalizations[i]`` (its own label set)
    after ``prompts[i]``. ``artifact``: shared, or one per prompt, so rows of different tasks share batches."""
    artifacts = _row_artifacts(base, artifact)
    if base.is_encoder_decoder:
        return _encoder_decoder_scores(base, artifacts, prompts, verbalizations, batch_size)
    scores = [torch.zeros(len(v)) for v in verbalizations]
    pad = base.pad_id
    if all(len(t) == 1 for v in verbalizations for t in v):  # one forward per example scores every label
        for chunk in length_sorted_chunks([len(p) for p in prompts], batch_size):
            batch = collate([Encoded(prompts[i][:-1], prompts[i][-1:]) for i in chunk], pad, base.device)
            last = batch.positions[-1:] + 1  # the final column: logits after the whole prompt
            logits = forward(base, _context(artifacts, chunk), batch.input_ids, batch.attention_mask,
                             logits_positions=last).logits
            logp = logits[:, -1].float().log_softmax(-1).cpu()  # [B, V]
            for row, i in enumerate(chunk):
                scores[i] = logp[row, [t[0] for t in verbalizations[i]]]
        return scores
    pairs = [(i, c) for i in range(len(prompts)) for c in range(len(verbalizations[i]))]
    rows = [Encoded(prompts[i], verbalizations[i][c]) for i, c in pairs]
    for chunk in length_sorted_chunks([r.length for r in rows], batch_size):
        batch = collate([rows[k] for k in chunk], pad, base.device)
        ctx = _context(artifacts, [pairs[k][0] for k in chunk])
        logits = forward(base, ctx, batch.input_ids, batch.attention_mask, logits_positions=batch.positions).logits
        logp = logits.float().log_softmax(-1)  # [B, L, V]
        labels = batch.labels
        token_lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
        for k, total in zip(chunk, token_lp.sum(1).cpu().tolist(), strict=True):
            i, c = pairs[k]
            scores[i][c] = total
    return scores


def _encoder_decoder_scores(base, artifacts, prompts: list[list[int]], verbalizations: list[list[list[int]]],
                            batch_size: int) -> list[torch.Tensor]:
    """``row_label_scores`` on an encoder-decoder base: each verbalization written by the decoder, EOS included
    (``model/encoder_decoder_score.py``)."""
    pairs = [(i, c) for i in range(len(prompts)) for c in range(len(verbalizations[i]))]
    rows = [artifacts[i] for i, _ in pairs] if isinstance(artifacts, list) else [artifacts] * len(pairs)
    totals = encoder_decoder_score.target_logprobs(base, rows, [prompts[i] for i, _ in pairs],
                                                   [verbalizations[i][c] for i, c in pairs], batch_size)
    scores = [torch.zeros(len(v)) for v in verbalizations]
    for (i, c), total in zip(pairs, totals, strict=True):
        scores[i][c] = total
    return scores


def target_logprobs(base, artifact, prompts: list[list[int]], targets: list[list[int]],
                    batch_size: int = 16) -> list[tuple[float, int]]:
    """Per row ``(sum_j log p(y_j | context, x, y_<j), len(y))`` of target ``targets[i]`` after ``prompts[i]``
    (teacher forcing). ``artifact``: shared, or one per row."""
    scores = row_label_scores(base, artifact, prompts, [[t] for t in targets], batch_size)
    return [(float(s[0]), len(t)) for s, t in zip(scores, targets, strict=True)]


def _reference_logprobs(base, artifact, examples: list[Example], spec: TaskSpec,
                        batch_size: int) -> list[tuple[float, int]]:
    """``target_logprobs`` of the examples' own targets, tokenized and cut as training cuts them."""
    encoded, _ = encode(base, examples, spec)
    artifacts = _row_artifacts(base, artifact, [e.lead_ids for e in encoded])
    return target_logprobs(base, artifacts, [e.prompt_ids for e in encoded], [e.target_ids for e in encoded],
                           batch_size)


def verbalizations(base, spec: TaskSpec) -> list[list[int]]:
    """The token ids of each label's target, in label order."""
    return [base.tokenize(t) for t in label_targets(spec.prompt_format(base.tokenizer), spec.labels)]


def classify(base, artifact, examples: list[Example], spec: TaskSpec, batch_size: int = 16) -> list[str]:
    """Predicted label of every example (rank classification)."""
    leads, prompts = zip(*[prompt_ids(base, ex.prompt, spec) for ex in examples], strict=True) if examples else ((), ())
    artifacts = _row_artifacts(base, artifact, list(leads))
    best = label_scores(base, artifacts, list(prompts), verbalizations(base, spec), batch_size).argmax(1).tolist()
    return [spec.labels[i] for i in best]


def stop_tokens(base, spec: TaskSpec | None) -> set[int] | None:
    """Tokens that end generation: the model's EOS, and for a chat task the template's end-of-turn token."""
    if spec is None or spec.chat is None:
        return None
    end = base.tokenize(spec.prompt_format(base.tokenizer).end_of_turn)
    return eos_ids(base) | ({end[0]} if len(end) == 1 else set())


@torch.no_grad()
def generate_texts(
    base, artifact, prompts: list[str], spec: TaskSpec | None = None, max_new_tokens: int = 32,
    sampling: Sampling = GREEDY, batch_size: int = 16,
) -> list[str]:
    """Decoded continuations of already-rendered prompts (placement markers allowed), in input order.
    ``artifact``: shared or one per prompt."""
    split = [prompt_ids(base, p, spec) if spec is not None else split_prompt(base, p) for p in prompts]
    leads, ids = [lead for lead, _ in split], [rest for _, rest in split]
    artifacts = _row_artifacts(base, artifact, leads)
    return _generate_rows(base, artifacts, ids, max_new_tokens, sampling, batch_size, stop_tokens(base, spec))


def _generate_rows(base, artifacts, ids: list[list[int]], max_new_tokens: int, sampling: Sampling,
                   batch_size: int, stop_ids: set[int] | None = None) -> list[str]:
    out: list[str] = [""] * len(ids)
    for chunk in length_sorted_chunks([len(i) for i in ids], batch_size):
        rows = [artifacts[i] for i in chunk] if isinstance(artifacts, list) else artifacts
        new = generate_ids(base, [ids[i] for i in chunk], rows, max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_ids=stop_ids)
        for i, tokens in zip(chunk, new, strict=True):
            out[i] = base.tokenizer.decode(tokens, skip_special_tokens=True)
    return out


def evaluate(
    base, adapter, examples: list[Example], spec: TaskSpec, batch_size: int = 16, max_new_tokens: int | None = None,
    return_outputs: bool = False,
) -> dict:
    """Metrics of ``adapter`` (an Adapter, an artifact or None for the bare model) on ``examples``.

    classify: ``{"n", "accuracy", "macro_f1"}``; generate: ``{"n", "bleu", "chrf", "rougeL", "perplexity"}``
    (``metrics.METRICS``). ``return_outputs`` adds ``"outputs"`` (predicted labels or generated texts) and for
    generation ``"target_logprobs"`` (per example, the reference's log-likelihood and token count).
    """
    logprobs = None
    if spec.task == "classify":
        pred = classify(base, adapter, examples, spec, batch_size)
    else:
        limit = max_new_tokens or spec.max_target_tokens
        pred = generate_texts(base, adapter, [ex.prompt for ex in examples], spec, limit, batch_size=batch_size)
        logprobs = _reference_logprobs(base, adapter, examples, spec, batch_size)
    result = score_outputs(spec, examples, pred, logprobs)
    if return_outputs:
        result["outputs"] = pred
        if logprobs is not None:
            result["target_logprobs"] = logprobs
    return result


def evaluate_tasks(
    base, tasks: list[tuple], batch_size: int = 16, max_new_tokens: int | None = None, return_outputs: bool = False,
) -> list[dict]:
    """Several tasks evaluated together: ``tasks`` is a list of ``(adapter, examples, spec)`` (adapter as in
    ``evaluate``). Rows of different tasks share batches, one artifact per row (a ``VirtualContext``, what
    ``PromptTable.context`` builds); each task's metrics equal ``evaluate`` on it alone. Generation tasks share
    batches with the tasks that have the same decoding limit."""
    owner = [k for k, (_, examples, _) in enumerate(tasks) for _ in examples]
    flat = [(ex, spec) for _, examples, spec in tasks for ex in examples]
    split = [prompt_ids(base, ex.prompt, spec) for ex, spec in flat]
    prompts = [ids for _, ids in split]
    artifacts = _row_artifacts(base, [adapter for adapter, examples, _ in tasks for _ in examples],
                               [lead for lead, _ in split])
    outputs: list[str | None] = [None] * len(flat)
    classify_rows = [i for i, (_, spec) in enumerate(flat) if spec.task == "classify"]
    if classify_rows:
        verbal = {k: verbalizations(base, spec) for k, (_, _, spec) in enumerate(tasks) if spec.task == "classify"}
        scores = row_label_scores(base, [artifacts[i] for i in classify_rows], [prompts[i] for i in classify_rows],
                                  [verbal[owner[i]] for i in classify_rows], batch_size)
        for i, row in zip(classify_rows, scores, strict=True):
            outputs[i] = flat[i][1].labels[int(row.argmax())]
    limits: dict[tuple, list[int]] = {}  # rows sharing a decoding limit and stop tokens share batches
    for i, (_, spec) in enumerate(flat):
        if spec.task != "classify":
            stops = stop_tokens(base, spec)
            key = (max_new_tokens or spec.max_target_tokens, frozenset(stops) if stops is not None else None)
            limits.setdefault(key, []).append(i)
    for (limit, stops), rows in limits.items():
        texts = _generate_rows(base, [artifacts[i] for i in rows], [prompts[i] for i in rows], limit, GREEDY,
                               batch_size, None if stops is None else set(stops))
        for i, text in zip(rows, texts, strict=True):
            outputs[i] = text
    logprobs: list[tuple[float, int] | None] = [None] * len(flat)
    generate_rows = [i for rows in limits.values() for i in rows]
    if generate_rows:
        encoded = [encode(base, [flat[i][0]], flat[i][1])[0][0] for i in generate_rows]  # leads as in `artifacts`
        scored = target_logprobs(base, [artifacts[i] for i in generate_rows], [e.prompt_ids for e in encoded],
                                 [e.target_ids for e in encoded], batch_size)
        for i, value in zip(generate_rows, scored, strict=True):
            logprobs[i] = value
    results = []
    for k, (_, examples, spec) in enumerate(tasks):
        mine = [i for i in range(len(flat)) if owner[i] == k]
        texts = [outputs[i] for i in mine]
        task_logprobs = None if spec.task == "classify" else [logprobs[i] for i in mine]
        result = score_outputs(spec, examples, texts, task_logprobs)
        if return_outputs:
            result["outputs"] = texts
            if task_logprobs is not None:
                result["target_logprobs"] = task_logprobs
        results.append(result)
    return results
