"""Evaluate an adapter (or the bare model) on task examples: run the model, then score with ``metrics.py``.

classify — rank classification, exact and without free generation: for every label ``c`` with verbalization tokens
``y^c = (y^c_1..y^c_n)`` (the target template rendered with ``c``)::

    score(c | x) = sum_j log p(y^c_j | context, x, y^c_<j)        prediction = argmax_c score(c | x)

When every verbalization is one token a single forward per example gives all scores (the same numbers, ``C`` times
cheaper).

generate — greedy decoding with the adapter (``model/decode_loop.py``), and the log-likelihood of each reference target
under teacher forcing (the same sum as above with the target's tokens, for the perplexity).

Each adapter is placed after its rows' lead and put in the form it is served in once (``FrozenBase.served``: on a
decoder-only base a soft prompt becomes the exact KV prefix it produces, so the P virtual positions are not re-run in
every batch); the scores are the base model's (``FrozenBase.row_label_scores``: on an encoder-decoder base the
decoder writes each verbalization / target, its end-of-sequence token included). One path evaluates: ``evaluate`` is
``evaluate_tasks`` of one task, whose rows of different tasks share batches.
"""

from __future__ import annotations

import torch

from softprompts.data.datasets import Example, label_targets
from softprompts.metrics import score_outputs
from softprompts.model.artifacts import Artifact
from softprompts.model.decode_loop import generate_ids
from softprompts.model.generation import GREEDY, Sampling
from softprompts.model.padding import length_sorted_chunks
from softprompts.tasks import TaskSpec, encode, prompt_ids, split_prompt, turn_stop_ids


def _row_artifacts(base, artifact, leads=None):
    """What rows run with: the served form of a shared artifact, or a list with one per row (``artifact`` a per-row
    list, or per-row ``leads``): each distinct (artifact, lead) placed and served once (``FrozenBase.served``)."""
    if not leads or not any(leads):
        if not isinstance(artifact, list):
            return base.served(artifact)
        leads = [()] * len(artifact)
    rows = artifact if isinstance(artifact, list) else [artifact] * len(leads)
    done: dict[tuple, Artifact | None] = {}
    out = []
    for a, lead in zip(rows, leads, strict=True):
        key = (id(a), tuple(lead))
        if key not in done:
            done[key] = base.served(a, lead)
        out.append(done[key])
    return out


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
    return base.row_label_scores(_row_artifacts(base, artifact), prompts, verbalizations, batch_size)


def target_logprobs(base, artifact, prompts: list[list[int]], targets: list[list[int]],
                    batch_size: int = 16) -> list[tuple[float, int]]:
    """Per row ``(sum_j log p(y_j | context, x, y_<j), len(y))`` of target ``targets[i]`` after ``prompts[i]``
    (teacher forcing). ``artifact``: shared, or one per row."""
    scores = row_label_scores(base, artifact, prompts, [[t] for t in targets], batch_size)
    return [(float(s[0]), len(t)) for s, t in zip(scores, targets, strict=True)]


def verbalizations(base, spec: TaskSpec) -> list[list[int]]:
    """The token ids of each label's target, in label order."""
    return [base.tokenize(t) for t in label_targets(spec.prompt_format(base.tokenizer), spec.labels)]


def classify(base, artifact, examples: list[Example], spec: TaskSpec, batch_size: int = 16) -> list[str]:
    """Predicted label of every example (rank classification)."""
    return evaluate(base, artifact, examples, spec, batch_size, return_outputs=True)["outputs"]


def stop_tokens(base, spec: TaskSpec | None) -> frozenset[int] | None:
    """Tokens that end generation for ``spec`` (``tasks.turn_stop_ids``: for a chat task the model's EOS and the
    token that closes the template's turn; ``None``, the model's EOS, otherwise)."""
    chat = spec is not None and spec.chat is not None
    return turn_stop_ids(base, spec.prompt_format(base.tokenizer) if chat else None)


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
                   batch_size: int, stops: frozenset[int] | None = None) -> list[str]:
    out: list[str] = [""] * len(ids)
    for chunk in length_sorted_chunks([len(i) for i in ids], batch_size):
        rows = [artifacts[i] for i in chunk] if isinstance(artifacts, list) else artifacts
        new = generate_ids(base, [ids[i] for i in chunk], rows, max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_ids=stops)
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
    return evaluate_tasks(base, [(adapter, examples, spec)], batch_size, max_new_tokens, return_outputs)[0]


def evaluate_tasks(
    base, tasks: list[tuple], batch_size: int = 16, max_new_tokens: int | None = None, return_outputs: bool = False,
) -> list[dict]:
    """Several tasks evaluated together: ``tasks`` is a list of ``(adapter, examples, spec)`` (adapter as in
    ``evaluate``). Rows of different tasks share batches, one artifact per row (what ``PromptTable.context`` builds);
    each task's metrics equal ``evaluate`` on it alone. Generation tasks share batches with the tasks that have the
    same decoding limit and stop tokens."""
    rows = _Rows(base, tasks, batch_size)
    rows.classify()
    rows.generate(max_new_tokens)
    results = []
    for k, (_, examples, spec) in enumerate(tasks):
        mine = [i for i in range(len(rows.flat)) if rows.owner[i] == k]
        texts = [rows.outputs[i] for i in mine]
        task_logprobs = None if spec.task == "classify" else [rows.logprobs[i] for i in mine]
        result = score_outputs(spec, examples, texts, task_logprobs)
        if return_outputs:
            result["outputs"] = texts
            if task_logprobs is not None:
                result["target_logprobs"] = task_logprobs
        results.append(result)
    return results


class _Rows:
    """Every example of every task as one row: its prompt ids, its served artifact and, once run, its output."""

    def __init__(self, base, tasks: list[tuple], batch_size: int) -> None:
        self.base, self.tasks, self.batch_size = base, tasks, batch_size
        self.owner = [k for k, (_, examples, _) in enumerate(tasks) for _ in examples]
        self.flat = [(ex, spec) for _, examples, spec in tasks for ex in examples]
        split = [prompt_ids(base, ex.prompt, spec) for ex, spec in self.flat]
        self.prompts = [ids for _, ids in split]
        self.artifacts = _row_artifacts(base, [adapter for adapter, examples, _ in tasks for _ in examples],
                                        [lead for lead, _ in split])
        self.outputs: list[str | None] = [None] * len(self.flat)
        self.logprobs: list[tuple[float, int] | None] = [None] * len(self.flat)

    def classify(self) -> None:
        """Rank classification of the classify rows: the label whose verbalization scores highest."""
        picked = [i for i, (_, spec) in enumerate(self.flat) if spec.task == "classify"]
        if not picked:
            return
        verbal = {k: verbalizations(self.base, spec) for k, (_, _, spec) in enumerate(self.tasks)
                  if spec.task == "classify"}
        scores = row_label_scores(self.base, [self.artifacts[i] for i in picked], [self.prompts[i] for i in picked],
                                  [verbal[self.owner[i]] for i in picked], self.batch_size)
        for i, row in zip(picked, scores, strict=True):
            self.outputs[i] = self.flat[i][1].labels[int(row.argmax())]

    def generate(self, max_new_tokens: int | None) -> None:
        """Greedy decoding of the generate rows (rows sharing a decoding limit and stop tokens share batches), then
        the log-likelihood of each reference target, tokenized and cut as training cuts it."""
        limits: dict[tuple, list[int]] = {}
        for i, (_, spec) in enumerate(self.flat):
            if spec.task != "classify":
                key = (max_new_tokens or spec.max_target_tokens, stop_tokens(self.base, spec))
                limits.setdefault(key, []).append(i)
        for (limit, stops), picked in limits.items():
            texts = _generate_rows(self.base, [self.artifacts[i] for i in picked], [self.prompts[i] for i in picked],
                                   limit, GREEDY, self.batch_size, stops)
            for i, text in zip(picked, texts, strict=True):
                self.outputs[i] = text
        picked = [i for rows in limits.values() for i in rows]
        if picked:
            encoded = [encode(self.base, [self.flat[i][0]], self.flat[i][1])[0][0] for i in picked]
            scored = target_logprobs(self.base, [self.artifacts[i] for i in picked], [e.prompt_ids for e in encoded],
                                     [e.target_ids for e in encoded], self.batch_size)
            for i, value in zip(picked, scored, strict=True):
                self.logprobs[i] = value
