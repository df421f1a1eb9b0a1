"""Task metrics from what evaluation produced: predicted labels, generated texts, target log-likelihoods.

classify: accuracy and macro-F1 (mean over labels of ``2 TP / (2 TP + FP + FN)``).
generate: sacrebleu's corpus BLEU and chrF, rouge-score's ROUGE-L F1 (mean over examples), exact match and
"contains" (the share of outputs equal to, or containing, their reference after SQuAD's normalization: lower case,
no punctuation, no articles, single spaces; what short factual answers are scored by), all on a 0-100 scale, and the
perplexity of the reference targets, ``exp(- sum log p(y_j | ...) / number of target tokens)`` over the set.

``METRICS[task]`` lists exactly the keys ``score_outputs`` returns (besides ``n``); the dataset catalog advertises
only these. ``PRIMARY_METRIC[task]`` is the one training keeps the best adapter by and compare ranks by (higher is
better for both).
"""

from __future__ import annotations

import math
import re
import string

from softprompts.data.datasets import Example
from softprompts.tasks import TaskSpec

PRIMARY_METRIC = {"classify": "accuracy", "generate": "chrf"}
METRICS = {"classify": ("accuracy", "macro_f1"),
           "generate": ("bleu", "chrf", "rougeL", "exact_match", "contains", "perplexity")}
ARTICLES = re.compile(r"\b(a|an|the)\b")


def binomial_difference_se(a: float, b: float, n: int) -> float:
    """The standard error of the difference of two accuracies ``a`` and ``b`` (fractions) each measured on ``n``
    examples, as if independent: ``sqrt((a (1 - a) + b (1 - b)) / n)``. The one noise rule of a single-seed gap
    (``compare``'s recommendation, ``tune``'s choice against the defaults)."""
    return math.sqrt((max(a * (1 - a), 1e-12) + max(b * (1 - b), 1e-12)) / n)


def macro_f1(gold: list[str], pred: list[str], labels: list[str]) -> float:
    """Mean over labels of F1 = 2 TP / (2 TP + FP + FN) (a label never predicted nor present counts 0)."""
    total = 0.0
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, pred, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, pred, strict=True))
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(labels)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(ARTICLES.sub(" ", text).split())


def generation_metrics(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu), mean ROUGE-L F1 (rouge-score, stemmed), exact match and contains, 0-100."""
    import sacrebleu  # imported when first scoring a generation task (slow to import)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references, strict=True)]
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
        "rougeL": 100.0 * sum(rouge) / len(rouge),
        "exact_match": 100.0 * sum(normalize_answer(h) == normalize_answer(r)
                                   for h, r in zip(hypotheses, references, strict=True)) / len(references),
        "contains": 100.0 * sum(normalize_answer(r) in normalize_answer(h)
                                for h, r in zip(hypotheses, references, strict=True)) / len(references),
    }


def perplexity(target_logprobs: list[tuple[float, int]]) -> float:
    """``exp(-sum logp / sum tokens)`` over ``(sum of a target's token log-probabilities, its token count)`` pairs."""
    tokens = sum(n for _, n in target_logprobs)
    if tokens == 0:
        return math.nan
    return math.exp(-sum(lp for lp, _ in target_logprobs) / tokens)


def score_outputs(spec: TaskSpec, examples: list[Example], outputs: list[str],
                  target_logprobs: list[tuple[float, int]] | None = None) -> dict:
    """Metrics from predicted labels (classify) or generated texts (generate), aligned with ``examples``;
    ``target_logprobs`` (generate): per example the log-likelihood of its reference and its token count."""
    if spec.task == "classify":
        gold = [ex.label for ex in examples]
        acc = sum(g == p for g, p in zip(gold, outputs, strict=True)) / len(gold)
        return {"n": len(examples), "accuracy": acc, "macro_f1": macro_f1(gold, outputs, spec.labels)}
    refs = [(ex.reference if ex.reference is not None else ex.target).strip() for ex in examples]
    result = {"n": len(examples), **generation_metrics([o.strip() for o in outputs], refs)}
    if target_logprobs is not None:
        result["perplexity"] = perplexity(target_logprobs)
    return result


__all__ = ["METRICS", "PRIMARY_METRIC", "generation_metrics", "macro_f1", "normalize_answer", "perplexity",
           "score_outputs"]
