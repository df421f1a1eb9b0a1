"""Evaluate an adapter (or the bare model) on task examples.

classify — rank classification, exact and without free generation: for every label ``c`` with verbalization tokens
``y^c = (y^c_1..y^c_n)`` (the target template rendered with ``c``)::

    score(c | x) = sum_j log p(y^c_j | context, x, y^c_<j)        prediction = argmax_c score(c | x)

reported as accuracy and macro-F1 (mean over labels of 2PR / (P + R)). When every verbalization is one token a single
forward per example gives all scores (the same numbers, ``C`` times cheaper).

generate — greedy decoding with the adapter, scored against the rendered targets with sacrebleu (BLEU, chrF) and
rouge-score (ROUGE-L F1, mean over examples).

A soft prompt is turned into the exact KV prefix it produces once (``BaseModel.soft_prompt_to_kv``) before
evaluating: the same outputs, without re-running the P virtual positions in every batch.
"""

from __future__ import annotations

import torch

from softprompts.data.datasets import Example
from softprompts.model.artifacts import Artifact, SoftPrompt
from softprompts.model.decode import GREEDY, Sampling, generate_ids
from softprompts.model.inject import VirtualContext, forward
from softprompts.tasks import Encoded, TaskSpec, collate, length_sorted_chunks, truncate_prompt

PRIMARY_METRIC = {"classify": "accuracy", "generate": "chrf"}


def serving_artifact(base, artifact) -> Artifact | None:
    """Accepts an Adapter, an artifact or None; soft prompts become their (exactly equal) KV prefix."""
    artifact = getattr(artifact, "artifact", artifact)
    if artifact is None:
        return None
    artifact = artifact.to(base.device, base.dtype)
    return base.soft_prompt_to_kv(artifact) if isinstance(artifact, SoftPrompt) else artifact


def _pad_id(base) -> int:
    tok = base.tokenizer
    return tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0


def _row_artifacts(base, artifact):
    """``serving_artifact`` of a shared artifact, or of each entry of a per-row list (each distinct one once)."""
    if not isinstance(artifact, list):
        return serving_artifact(base, artifact)
    done: dict[int, Artifact | None] = {}
    for a in artifact:
        if id(a) not in done:
            done[id(a)] = serving_artifact(base, a)
    return [done[id(a)] for a in artifact]


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
    scores = [torch.zeros(len(v)) for v in verbalizations]
    pad = _pad_id(base)
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


def macro_f1(gold: list[str], pred: list[str], labels: list[str]) -> float:
    """Mean over labels of F1 = 2 TP / (2 TP + FP + FN) (a label never predicted nor present counts 0)."""
    total = 0.0
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, pred, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, pred, strict=True))
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(labels)


def classify(base, artifact, examples: list[Example], spec: TaskSpec, batch_size: int = 16) -> list[str]:
    """Predicted label of every example (rank classification)."""
    from softprompts.data.datasets import label_targets

    verbal = [base.tokenize(t) for t in label_targets(spec.template, spec.labels)]
    prompts = [truncate_prompt(base.tokenize(ex.prompt), spec) for ex in examples]
    best = label_scores(base, artifact, prompts, verbal, batch_size).argmax(1).tolist()
    return [spec.labels[i] for i in best]


@torch.no_grad()
def generate_texts(
    base, artifact, prompts: list[str], spec: TaskSpec | None = None, max_new_tokens: int = 32,
    sampling: Sampling = GREEDY, batch_size: int = 16,
) -> list[str]:
    """Decoded continuations of already-rendered prompts, in input order. ``artifact``: shared or one per prompt."""
    ids = [base.tokenize(p) for p in prompts]
    if spec is not None:
        ids = [truncate_prompt(i, spec) for i in ids]
    return _generate_rows(base, _row_artifacts(base, artifact), ids, max_new_tokens, sampling, batch_size)


def _generate_rows(base, artifacts, ids: list[list[int]], max_new_tokens: int, sampling: Sampling,
                   batch_size: int) -> list[str]:
    out: list[str] = [""] * len(ids)
    for chunk in length_sorted_chunks([len(i) for i in ids], batch_size):
        rows = [artifacts[i] for i in chunk] if isinstance(artifacts, list) else artifacts
        new = generate_ids(base, [ids[i] for i in chunk], rows, max_new_tokens=max_new_tokens, sampling=sampling)
        for i, tokens in zip(chunk, new, strict=True):
            out[i] = base.tokenizer.decode(tokens, skip_special_tokens=True)
    return out


def generation_metrics(hypotheses: list[str], references: list[str]) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references, strict=True)]
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
        "rougeL": 100.0 * sum(rouge) / len(rouge),
    }


def evaluate(
    base, adapter, examples: list[Example], spec: TaskSpec, batch_size: int = 16, max_new_tokens: int | None = None,
    return_outputs: bool = False,
) -> dict:
    """Metrics of ``adapter`` (an Adapter, an artifact or None for the bare model) on ``examples``.

    classify: ``{"n", "accuracy", "macro_f1"}``; generate: ``{"n", "bleu", "chrf", "rougeL"}`` (0-100 scale).
    ``return_outputs`` adds ``"outputs"``: predicted labels or generated texts.
    """
    if spec.task == "classify":
        pred = classify(base, adapter, examples, spec, batch_size)
    else:
        limit = max_new_tokens or spec.max_target_tokens
        pred = generate_texts(base, adapter, [ex.prompt for ex in examples], spec, limit, batch_size=batch_size)
    result = score_outputs(spec, examples, pred)
    if return_outputs:
        result["outputs"] = pred
    return result


def evaluate_tasks(
    base, tasks: list[tuple], batch_size: int = 16, max_new_tokens: int | None = None, return_outputs: bool = False,
) -> list[dict]:
    """Several tasks evaluated together: ``tasks`` is a list of ``(adapter, examples, spec)`` (adapter as in
    ``evaluate``). Rows of different tasks share batches, one artifact per row (a ``VirtualContext``, what
    ``PromptTable.context`` builds); each task's metrics equal ``evaluate`` on it alone. Generation tasks share
    batches with the tasks that have the same decoding limit."""
    artifacts = _row_artifacts(base, [adapter for adapter, examples, _ in tasks for _ in examples])
    owner = [k for k, (_, examples, _) in enumerate(tasks) for _ in examples]
    flat = [(ex, spec) for _, examples, spec in tasks for ex in examples]
    prompts = [truncate_prompt(base.tokenize(ex.prompt), spec) for ex, spec in flat]
    outputs: list[str | None] = [None] * len(flat)
    classify_rows = [i for i, (_, spec) in enumerate(flat) if spec.task == "classify"]
    if classify_rows:
        from softprompts.data.datasets import label_targets

        verbal = {k: [base.tokenize(t) for t in label_targets(spec.template, spec.labels)]
                  for k, (_, _, spec) in enumerate(tasks) if spec.task == "classify"}
        scores = row_label_scores(base, [artifacts[i] for i in classify_rows], [prompts[i] for i in classify_rows],
                                  [verbal[owner[i]] for i in classify_rows], batch_size)
        for i, row in zip(classify_rows, scores, strict=True):
            outputs[i] = flat[i][1].labels[int(row.argmax())]
    limits: dict[int, list[int]] = {}
    for i, (_, spec) in enumerate(flat):
        if spec.task != "classify":
            limits.setdefault(max_new_tokens or spec.max_target_tokens, []).append(i)
    for limit, rows in limits.items():
        texts = _generate_rows(base, [artifacts[i] for i in rows], [prompts[i] for i in rows], limit, GREEDY,
                               batch_size)
        for i, text in zip(rows, texts, strict=True):
            outputs[i] = text
    results = []
    for k, (_, examples, spec) in enumerate(tasks):
        mine = [outputs[i] for i in range(len(flat)) if owner[i] == k]
        result = score_outputs(spec, examples, mine)
        if return_outputs:
            result["outputs"] = mine
        results.append(result)
    return results


def score_outputs(spec: TaskSpec, examples: list[Example], outputs: list[str]) -> dict:
    """Metrics from predicted labels (classify) or generated texts (generate), aligned with ``examples``."""
    if spec.task == "classify":
        gold = [ex.label for ex in examples]
        acc = sum(g == p for g, p in zip(gold, outputs, strict=True)) / len(gold)
        return {"n": len(examples), "accuracy": acc, "macro_f1": macro_f1(gold, outputs, spec.labels)}
    refs = [ex.target.strip() for ex in examples]
    return {"n": len(examples), **generation_metrics([o.strip() for o in outputs], refs)}
