"""One few-shot run of a compare: choose k on dev, score test, measure what the demonstrations cost per request.

Quality: ``evaluate`` (the methods' own metric code and batches) of each row after the demonstrations' served form
``FrozenBase.served(None, ids(lead))``: on a decoder-only base the KV the demonstrations' text leaves, computed once
(``text_to_kv``; ``compare/fewshot.py`` shows why this equals the demonstrations in the prompt), on an
encoder-decoder base their embeddings read by the encoder in front of each row.

k: ``--shots K``, or the best dev score among ``SHOT_CANDIDATES`` that the data can balance and whose rows fit the
context (dev and test rows: a capacity check on lengths, no test answer is read); a tie goes to fewer shots. k = 0
is the bare model (its dev score comes from the base run).

Cost, on the first scored row (batch 1, timed as the methods are, beside the bare model), with ``L`` demonstration
tokens, ``T`` the row's prompt tokens, ``N`` its answer tokens and ``b`` KV bytes per position::

    in the prompt   prefill of L + T tokens (time to first token), then each token attends to L + T + n positions
    cached          the L positions' KV made once from the text; each request prefills its T tokens only
    prompt tokens per request   L + mean T (bare: mean T of the rows' own prompts)
    KV per request  (L + T + N) * b, in the prompt and cached alike (our decode batch holds each row's prefix in
                    that row's cache: caching saves the prefill, not the memory); the prefix alone is L * b
    context left    context_limit - L positions for the row and its answer

Check: on the first ``CHECK_ROWS`` scored rows the answer's log-likelihood with the demonstrations as tokens in the
prompt (the bare model on ``ids(lead) + ids(row)``) against after the served prefix; the largest difference is
recorded (float rounding only), and how many rows tokenize as one string to ``ids(lead) + ids(row)``.
"""

from __future__ import annotations

import time
from collections import Counter

from softprompts.compare.config import SHOT_CANDIDATES, CompareConfig, CompareData
from softprompts.compare.fewshot import (
    FewShotError,
    FewShotPrompts,
    FewShotTask,
    eligible,
    fit_problem,
    pick,
    shot_order,
)
from softprompts.compare.latency import kv_bytes_per_position, measure_latency, peak_memory_bytes, reset_peak_memory
from softprompts.data.datasets import Example
from softprompts.evaluate import evaluate, target_logprobs
from softprompts.metrics import PRIMARY_METRIC
from softprompts.model.artifacts import KVPrefix
from softprompts.model.placement import start_ids
from softprompts.tasks import encode, prompt_ids

CHECK_ROWS = 8


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


class FewShotRun:
    """The few-shot baseline on a compare's data: ``run(seed, base_dev, bare_latency)`` -> its result.json."""

    def __init__(self, base, data: CompareData, dev: list[Example], test: list[Example], config: CompareConfig):
        rows = data.rows or {}
        self.base, self.spec, self.config = base, data.spec, config
        self.task = FewShotTask(data.spec, base.tokenizer, data.train, rows.get("train"))
        self.splits = {"dev": (dev, None if rows.get("dev") is None else rows["dev"][: len(dev)]),
                       "test": (test, None if rows.get("test") is None else rows["test"][: len(test)])}
        self.candidates = eligible(data.train, data.dev + data.test)
        self.primary = PRIMARY_METRIC[data.spec.task]
        self.labels = data.spec.labels if data.spec.task == "classify" else None  # demonstrations balance over them

    # --- writing and scoring -----------------------------------------------------------------------------------
    def prompts(self, shots: tuple[int, ...], split: str) -> FewShotPrompts:
        examples, rows = self.splits[split]
        return self.task.prompts(shots, examples, rows)

    def lead_ids(self, prompts: FewShotPrompts) -> list[int]:
        """The demonstrations' ids, from the sequence's start (the base's BOS first: ``placement.start_ids``)."""
        return start_ids(self.base, self.base.tokenize(prompts.lead)) if prompts.shots else []

    def served(self, prompts: FewShotPrompts) -> tuple[list[int], object]:
        """``(ids(lead), its served form)``; ``([], None)`` for k = 0."""
        lead_ids = self.lead_ids(prompts)
        return lead_ids, (self.base.served(None, lead_ids) if lead_ids else None)

    def score(self, shots: tuple[int, ...], split: str) -> dict:
        """The split's metrics (and ``outputs``) with ``shots`` in front of every row."""
        prompts = self.prompts(shots, split)
        if not prompts.examples:
            return {}
        return evaluate(self.base, self.served(prompts)[1], prompts.examples, self.spec, return_outputs=True)

    def fit(self, shots: tuple[int, ...]) -> str | None:
        """Why these demonstrations overflow the context on a dev or test row, or None."""
        for split in ("dev", "test"):
            prompts = self.prompts(shots, split)
            problem = fit_problem(self.base, self.lead_ids(prompts), prompts.examples, self.spec)
            if problem:
                return f"on a {split} row, {problem}"
        return None

    # --- choosing k --------------------------------------------------------------------------------------------
    def draw(self, order: list[int], k: int, seed: int) -> tuple[int, ...]:
        """The ``k`` demonstrations of ``order`` (``pick``), written for the dev and test rows and fitted to the
        context; ``FewShotError`` saying why not."""
        shots = pick(order, k, self.task.train, self.labels, seed)
        problem = self.fit(shots)
        if problem:
            raise FewShotError(f"{k}-shot does not fit: {problem}")
        return shots

    def preflight(self, seeds: int) -> list[str]:
        """What ``run`` would refuse, found before any training: with ``--shots K``, the K demonstrations of every
        seed drawn, rendered and fitted (a k chosen on dev skips what does not fit, and k = 0 always can)."""
        if self.config.shots is None:
            return []
        problems = []
        for seed in range(seeds):
            try:
                self.draw(shot_order(self.task.train, self.candidates, self.labels, seed), self.config.shots, seed)
            except FewShotError as exc:
                problems.append(f"--baseline fewshot (seed {seed}): {exc}")
        return list(dict.fromkeys(problems))

    def choose(self, seed: int, base_dev: dict | None) -> tuple[tuple[int, ...], dict]:
        """``(shots, {"dev_by_shots": dev score per k, "skipped": why each skipped k was, "dev_predictions": per k
        how often each label was predicted on dev (classification)})``."""
        order = shot_order(self.task.train, self.candidates, self.labels, seed)
        fixed = self.config.shots is not None
        if not fixed and not self.splits["dev"][0]:
            raise FewShotError("choosing k for --baseline fewshot needs dev rows (--eval-data, or a --dataset with a "
                               "dev split); or fix it with --shots K")
        scores, skipped, picked, predicted = {}, {}, {}, {}
        for k in (self.config.shots,) if fixed else SHOT_CANDIDATES:
            try:
                picked[k] = self.draw(order, k, seed)
            except FewShotError as exc:
                if fixed:
                    raise
                skipped[str(k)] = str(exc)
                continue
            dev = {self.primary: base_dev[self.primary]} if not k and self.primary in (base_dev or {}) else \
                self.score(picked[k], "dev")
            scores[str(k)] = dev.get(self.primary)
            if self.labels and "outputs" in dev:
                predicted[str(k)] = dict(Counter(dev["outputs"]).most_common())
        best = max(scores, key=lambda k: (scores[k] if scores[k] is not None else float("-inf"), -int(k)))
        return picked[int(best)], {"dev_by_shots": scores, "skipped": skipped, "dev_predictions": predicted}

    # --- cost --------------------------------------------------------------------------------------------------
    def cost(self, prompts: FewShotPrompts, lead_ids: list[int], artifact, bare_rows: list[Example]) -> dict:
        """Latency in the prompt and cached, tokens, KV bytes and context per request (module docstring)."""
        c, base = self.config, self.base
        ids = prompt_ids(base, prompts.examples[0].prompt, self.spec)[1]
        in_prompt = measure_latency(base, lead_ids + ids, None, c.latency_tokens, c.latency_repeats).to_json()
        cached = (measure_latency(base, ids, artifact, c.latency_tokens, c.latency_repeats).to_json()
                  if isinstance(artifact, KVPrefix) else None)
        encoded, _ = encode(base, prompts.examples, self.spec)
        answer = _mean([len(e.target_ids) for e in encoded])
        rows = _mean([len(e.prompt_ids) for e in encoded])
        bare = _mean([sum(map(len, prompt_ids(base, ex.prompt, self.spec))) for ex in bare_rows])
        per_position = kv_bytes_per_position(base)
        return {"latency": in_prompt, "latency_cached": cached, "demo_tokens": len(lead_ids),
                "prompt_tokens": len(lead_ids) + rows, "bare_prompt_tokens": bare,
                "kv_bytes_per_position": per_position,
                "kv_bytes_per_request": round((len(lead_ids) + rows + answer) * per_position),
                "bare_kv_bytes_per_request": round((bare + answer) * per_position),
                "prefix_kv_bytes": len(lead_ids) * per_position,
                "context_limit": base.context_limit, "context_left": base.context_limit - len(lead_ids)}

    def check(self, prompts: FewShotPrompts, lead_ids: list[int], artifact) -> dict:
        """In the prompt vs served prefix on the first rows (module docstring)."""
        sample = prompts.examples[:CHECK_ROWS]
        if not lead_ids or not sample:
            return {"rows": 0}
        encoded, _ = encode(self.base, sample, self.spec)
        targets = [e.target_ids for e in encoded]
        in_prompt = target_logprobs(self.base, None, [lead_ids + e.prompt_ids for e in encoded], targets)
        cached = target_logprobs(self.base, artifact, [e.prompt_ids for e in encoded], targets)
        one_string = sum(start_ids(self.base, self.base.tokenize(prompts.lead + ex.prompt))
                         == lead_ids + self.base.tokenize(ex.prompt)
                         for ex in sample)
        return {"rows": len(sample), "one_string_tokenizes_the_same": one_string,
                "max_abs_logprob_diff": max(abs(a[0] - b[0]) for a, b in zip(in_prompt, cached, strict=True))}

    # --- the run -----------------------------------------------------------------------------------------------
    def run(self, seed: int, base_dev: dict | None, bare_latency: dict) -> dict:
        """Choose k, score test (dev numbers when there is no test), measure cost and the check."""
        started = time.perf_counter()
        split = "test" if self.splits["test"][0] else "dev"
        if not self.splits[split][0]:
            raise FewShotError("--baseline fewshot scores dev or test rows: give --eval-data and/or --test-data")
        measure = reset_peak_memory(self.base.device)
        shots, chosen = self.choose(seed, base_dev)
        prompts = self.prompts(shots, split)
        lead_ids, artifact = self.served(prompts)
        test = evaluate(self.base, artifact, prompts.examples, self.spec, return_outputs=True) if split == "test" \
            else {}
        outputs, _ = test.pop("outputs", None), test.pop("target_logprobs", None)
        peak = peak_memory_bytes(self.base.device)
        cost = self.cost(prompts, lead_ids, artifact, self.splits[split][0])
        classify = self.spec.task == "classify"
        labels = Counter(self.task.train[i].label for i in shots) if classify else None
        predicted = dict(Counter(outputs).most_common()) if classify and outputs else None
        tensors = list(artifact.tensors().values()) if artifact is not None else []
        return {
            "impl": "fewshot", "method": "fewshot", "seed": seed, "artifact": getattr(artifact, "kind", None),
            "steps": 0, "trainable_params": 0, "adapter_params": sum(t.numel() for t in tensors),
            "adapter_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "best_dev": {self.primary: chosen["dev_by_shots"].get(str(len(shots)))}, "best_step": None,
            "test": test,
            "train_seconds": None, "tokens_per_second": None, "peak_memory_bytes": peak, "memory_measure": measure,
            "latency": cost.pop("latency"), "latency_bare": bare_latency, "curve": [], "issues": [],
            "shots_setting": self.config.shots,
            "fewshot": {"shots": len(shots), "chosen_by": "--shots" if self.config.shots is not None else "dev",
                        **chosen, "demonstrations": list(shots),
                        "label_counts": dict(labels) if labels else None, "test_predictions": predicted,
                        "lead": prompts.lead,
                        "eligible_rows": len(self.candidates),
                        "left_out_repeats": len(self.task.train) - len(self.candidates),
                        **cost, "check": self.check(prompts, lead_ids, artifact)},
            "wall_seconds": round(time.perf_counter() - started, 1),
        }


def fewshot_problems(config: CompareConfig, data: CompareData) -> list[str]:
    """What the few-shot baseline cannot do with these options and rows, found without the model: nothing to score,
    no dev rows to choose k on, chat rows without their messages, ``--shots K`` more than the training rows give or
    can balance over the labels (the same for every seed: only counts decide)."""
    if "fewshot" not in config.baselines:
        return []
    problems = []
    if not data.dev and not data.test:
        problems.append("--baseline fewshot scores dev or test rows: give --eval-data and/or --test-data")
    if config.shots is None and not data.dev:
        problems.append("choosing k for --baseline fewshot needs dev rows (--eval-data, a --dataset with a dev "
                        "split, or at least 10 training rows to carve them from); or fix it with --shots K")
    if data.spec.chat is not None and not (data.rows or {}).get("train"):
        problems.append("few-shot on chat rows writes demonstrations as turns: it needs the rows' messages "
                        "(CompareData.rows)")
    if config.shots is not None and config.shots >= 0:
        labels = data.spec.labels if data.spec.task == "classify" else None
        order = shot_order(data.train, eligible(data.train, data.dev + data.test), labels, 0)
        try:
            pick(order, config.shots, data.train, labels, 0)
        except FewShotError as exc:
            problems.append(str(exc))
    return problems


__all__ = ["CHECK_ROWS", "FewShotRun", "fewshot_problems"]
