"""The few-shot baseline: k demonstrations from the training data in front of every prompt, and no training.

Where demonstrations come from (``shot_order``, ``pick``): the TRAIN split only. Dev rows are never demonstrations
(dev chooses k, as it chooses the methods' best step: a dev row shown in the prompt would score its own answer), test
rows never (test only scores), and a train row whose rendered prompt equals a dev or test prompt is left out as well
(``eligible``: a text repeated across splits would otherwise show the model the answer it is scored on).

Which ones: one seeded order, and the demonstrations for ``k`` are its first ``k``, so the sets are nested
(k=2 inside k=4 inside k=8) and choosing k on dev compares more demonstrations, not other ones. For classification
the order is balanced over the ``C`` labels: the labels in a seeded order, each label's rows shuffled, taken round
robin, so the first ``k`` hold every label ``floor(k / C)`` or ``ceil(k / C)`` times (a ``k`` the data cannot
balance is refused). In the prompt the ``k`` appear in a seeded shuffle (no run of one label at the end).

How they are written (``FewShotTask.prompts``): with the task's own format. A template task: each demonstration is
its rendered prompt and target (the placement marker removed), one blank line between::

    lead = d_1.prompt + d_1.target + "\\n\\n" + ... + d_k.prompt + d_k.target        row = "\\n\\n" + x.prompt

A chat task (``messages`` rows): the demonstrations are turns of the conversation, after the row's system turn and
before its own turns, rendered by the model's chat template::

    lead = render(system + demo turns)
    row  = render(system + demo turns + row turns, generation prompt)[len(lead):]

The blank line opens each row rather than closing the lead: byte-level BPE tokenizers split whitespace against the
text after it, so ``ids(lead) + ids(row)`` is then also what the one string tokenizes to.

Exactness: the prompt is the token ids ``ids(lead) + ids(row)``. As a cache, ``ids(lead)`` runs through the model
once (``FrozenBase.served(None, ids(lead))``: on a decoder-only base the exact KV the text leaves, ``text_to_kv``)
and each row reads only its own tokens after it: the same positions and the same keys and values, so the same
scores (``tests/test_fewshot.py``). The row's own prompt is cut by ``--max-prompt-tokens`` as the methods' rows
are; the demonstrations never are: a ``k`` whose rows do not fit the context is refused (``fit_problem``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from softprompts.data.datasets import Example
from softprompts.data.templates import VIRTUAL
from softprompts.errors import SoftpromptsError
from softprompts.evaluate import verbalizations
from softprompts.model.generation import ContextLengthError
from softprompts.tasks import TaskSpec, encode

SEPARATOR = "\n\n"  # between two demonstrations, and between the last one and the row


class FewShotError(SoftpromptsError):
    """Demonstrations that cannot be drawn, rendered or fitted (the message says which and what to do)."""


def eligible(train: list[Example], held_out: list[Example]) -> list[int]:
    """Indices of the train rows that may be demonstrations: every row whose prompt is not a held-out prompt."""
    seen = {ex.prompt for ex in held_out}
    return [i for i, ex in enumerate(train) if ex.prompt not in seen]


def shot_order(train: list[Example], rows: list[int], labels: list[str] | None, seed: int) -> list[int]:
    """``rows`` (train indices) in the order demonstrations are taken: seeded, round robin over ``labels``."""
    rng = random.Random(f"fewshot-{seed}")
    if not labels:
        order = list(rows)
        rng.shuffle(order)
        return order
    by_label = {label: [i for i in rows if train[i].label == label] for label in labels}
    for members in by_label.values():
        rng.shuffle(members)
    turn = list(labels)
    rng.shuffle(turn)
    longest = max(len(members) for members in by_label.values())
    return [by_label[label][r] for r in range(longest) for label in turn if r < len(by_label[label])]


def pick(order: list[int], k: int, train: list[Example], labels: list[str] | None, seed: int) -> tuple[int, ...]:
    """The first ``k`` of ``order`` in their seeded prompt order; ``FewShotError`` when there are fewer than ``k``
    or (classification) they are not balanced over the labels."""
    if k > len(order):
        raise FewShotError(f"{k} demonstrations asked for, but only {len(order)} training rows can be demonstrations "
                           "(rows repeated in dev or test are left out): use fewer --shots or more training data")
    chosen = order[:k]
    if labels and k:
        counts = {label: sum(train[i].label == label for i in chosen) for label in labels}
        if max(counts.values()) - min(counts.values()) > 1:
            short = min(counts, key=counts.get)
            have = sum(train[i].label == short for i in order)
            raise FewShotError(f"{k} demonstrations balanced over {len(labels)} labels need {-(-k // len(labels))} "
                               f"labelled {short!r}; the training data has {have}: use fewer --shots")
    shown = list(chosen)
    random.Random(f"fewshot-{seed}-{k}").shuffle(shown)
    return tuple(shown)


@dataclass(frozen=True)
class FewShotPrompts:
    """k demonstrations written for some rows: ``lead`` the text in front of every row (empty for k = 0),
    ``examples`` each row's own prompt after it, with the row's target and label."""

    shots: tuple[int, ...]  # train indices, in prompt order
    lead: str
    examples: list[Example]


@dataclass
class FewShotTask:
    """Writes demonstrations with the task's own format: its template, or (chat) the model's chat template over the
    rows' messages (``train_rows[i]`` is ``train[i]``'s row)."""

    spec: TaskSpec
    tokenizer: object
    train: list[Example]
    train_rows: list[dict] | None = None

    def prompts(self, shots: tuple[int, ...], examples: list[Example], rows: list[dict] | None = None
                ) -> FewShotPrompts:
        """``shots`` in front of ``examples`` (``rows``: their rows, chat tasks only); k = 0 leaves them as they are
        (and no rows need no lead)."""
        if not shots or not examples:
            return FewShotPrompts(shots, "", list(examples))
        if self.spec.chat is None:
            return self._template(shots, examples)
        if self.train_rows is None or rows is None:
            raise FewShotError("few-shot on chat rows writes demonstrations as turns: it needs the rows' messages "
                               "(CompareData.rows)")
        return self._chat(shots, examples, rows)

    def _template(self, shots: tuple[int, ...], examples: list[Example]) -> FewShotPrompts:
        lead = SEPARATOR.join(self.train[i].prompt.replace(VIRTUAL, "") + self.train[i].target for i in shots)
        rest = [Example(SEPARATOR + ex.prompt.replace(VIRTUAL, ""), ex.target, ex.label) for ex in examples]
        return FewShotPrompts(shots, lead, rest)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def _chat(self, shots: tuple[int, ...], examples: list[Example], rows: list[dict]) -> FewShotPrompts:
        fmt = self.spec.prompt_format(self.tokenizer)
        demos = [m for i in shots for m in self.train_rows[i]["messages"] if m["role"] != "system"]
        leads, rest = set(), []
        for ex, row in zip(examples, rows, strict=True):
            conversation = fmt.conversation(row["messages"][:-1])
            head = conversation[:1] if conversation[0]["role"] == "system" else []
            lead = self._render(head + demos, False)
            full = self._render(head + demos + conversation[len(head):], True)
            if not full.startswith(lead):
                raise FewShotError("this chat template does not render turns one after another, so demonstrations "
                                   "cannot be a prefix shared by every row")
            leads.add(lead)
            rest.append(Example(full[len(lead):], ex.target, ex.label))
        if len(leads) > 1:
            raise FewShotError("the rows have different system messages, so the demonstrations (after the system "
                               "turn) are not one prefix for every row: give every row the same system message")
        return FewShotPrompts(shots, leads.pop() if leads else "", rest)


def answer_tokens(base, spec: TaskSpec) -> int:
    """The most tokens a row's answer takes: the longest label verbalization (classification) or
    ``max_target_tokens`` generated tokens."""
    return max(len(v) for v in verbalizations(base, spec)) if spec.task == "classify" else spec.max_target_tokens


def fit_problem(base, lead_ids: list[int], examples: list[Example], spec: TaskSpec) -> str | None:
    """Why ``lead_ids`` + the longest row (cut as the methods' rows are) + its answer overflow the model's context
    (``FrozenBase.check_fits``), or None when every row fits. The answer is the longest label verbalization
    (classification) or ``max_target_tokens`` generated tokens."""
    if not examples:
        return None
    encoded, _ = encode(base, examples, spec)
    longest = max(len(e.prompt_ids) for e in encoded)
    answer = answer_tokens(base, spec)
    try:
        base.check_fits(len(lead_ids) + longest, 0, answer, "answer tokens")
    except ContextLengthError as exc:
        return (f"the demonstrations take {len(lead_ids)} tokens, the longest row {longest} more and its answer up to "
                f"{answer}: {exc} (use fewer --shots; demonstrations are never truncated)")
    return None


__all__ = ["SEPARATOR", "FewShotError", "FewShotPrompts", "FewShotTask", "answer_tokens", "eligible", "fit_problem",
           "pick", "shot_order"]
