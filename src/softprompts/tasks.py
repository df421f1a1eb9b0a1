"""A task's tokens: how examples become token ids with loss positions, and how they are batched by length (the
task record itself, ``TaskSpec``, is ``task_spec.py``, below the adapter that holds one).

One example is ``prompt`` tokens ``x_1..x_m`` then ``target`` tokens ``y_1..y_n`` (tokenized separately, the same
way in training, evaluation and serving). The loss is on target tokens only::

    loss = - sum_j log p(y_j | virtual context, x, y_<j)

Truncation is explicit: a prompt longer than ``max_prompt_tokens`` keeps its LAST tokens (the end of a template such
as ``"...\\nSentiment:"`` is what the answer depends on), a target longer than ``max_target_tokens`` keeps its first
tokens. ``encode`` returns a ``TruncationReport`` that callers print.

Batches are left-padded: every row ends at the last column, so the ``L`` label positions of a batch (``L`` = its
longest target) are the last ``L`` columns and the LM head runs only there (``logits_positions``).

Placement: a rendered prompt may hold the marker ``<|virtual|>`` (``templates.VIRTUAL``; a template's marker, or a
chat format's placement). The text before it is tokenized on its own as the row's ``lead_ids``: the soft prompt is
placed after them (``model/placement.py`` folds them into the row's artifact), the tokens after the marker are the
row's ``prompt_ids``. Without a marker ``lead_ids`` is empty and nothing changes, except on a base whose
tokenizer adds BOS: every lead then starts with it (``placement.sequence_start``). Truncation cuts ``prompt_ids``
only (the lead is the fixed part of a template or a chat turn structure).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from softprompts.data.chat import ChatFormat
from softprompts.data.datasets import Example
from softprompts.data.templates import VIRTUAL
from softprompts.errors import SoftpromptsError
from softprompts.model.generation import eos_ids
from softprompts.model.padding import prompt_target_rows
from softprompts.model.placement import sequence_start
from softprompts.model.soft_targets import SoftTargets, stack_rows
from softprompts.task_spec import TaskSpec  # the record (torch-free, below the adapter): re-exported here


@dataclass
class TruncationReport:
    """How many examples were cut, and the longest lengths before cutting."""

    examples: int = 0
    prompts_truncated: int = 0
    targets_truncated: int = 0
    longest_prompt: int = 0
    longest_target: int = 0

    def message(self, spec: TaskSpec, what: str = "data") -> str | None:
        if not (self.prompts_truncated or self.targets_truncated):
            return None
        return (
            f"{what}: truncated {self.prompts_truncated}/{self.examples} prompts to their last "
            f"{spec.max_prompt_tokens} tokens (longest {self.longest_prompt}) and {self.targets_truncated} targets to "
            f"{spec.max_target_tokens} tokens (longest {self.longest_target})"
        )


@dataclass(frozen=True)
class Encoded:
    prompt_ids: list[int]
    target_ids: list[int]
    label: str | None = None
    lead_ids: tuple[int, ...] = ()  # the tokens in front of the soft prompt (placement; see the module docstring)
    soft_targets: SoftTargets | None = None  # a teacher's top-k per target token ([n, k]): distillation targets

    @property
    def length(self) -> int:
        """All the positions the row takes besides the virtual tokens: lead + prompt + target."""
        return len(self.lead_ids) + len(self.prompt_ids) + len(self.target_ids)


def split_prompt(base, text: str) -> tuple[tuple[int, ...], list[int]]:
    """``(lead_ids, prompt_ids)`` of a rendered prompt: tokenized on each side of the placement marker, the base's
    BOS first when its tokenizer adds one (``placement.sequence_start``: **the** rule, for every prompt trained on,
    evaluated, generated or served)."""
    lead, marker, rest = text.partition(VIRTUAL)
    if not marker:
        return sequence_start(base, (), base.tokenize(text))
    return sequence_start(base, base.tokenize(lead), base.tokenize(rest))


def prompt_ids(base, text: str, spec: TaskSpec) -> tuple[tuple[int, ...], list[int]]:
    """``split_prompt`` with the spec's truncation of the prompt part (inference)."""
    lead, ids = split_prompt(base, text)
    return lead, truncate_prompt(ids, spec)


def turn_stop_ids(base, chat: ChatFormat | None) -> frozenset[int] | None:
    """The tokens that end an answer on ``base`` in a prompt format: **the** stop rule of chat generation (the CLI,
    ``evaluate``, both serving engines and self-study call it; nothing else reads ``end_of_turn`` for it).

    For a chat format: the model's end of sequence (``eos_ids``) and the special token that closes the template's
    assistant turn, ``S`` in ``end_of_turn = t + S`` (``<|im_end|>`` for ChatML). When ``t`` is not empty (a
    template that writes ``"\\n<|end|>"`` after the content) the end of turn is several tokens; the decode loop
    stops on single tokens, so the answer stops on ``S``, the token that completes the sequence and that the model
    writes only where its turn ends. ``t``'s tokens stay in the answer (they are text: a trailing newline); they are
    never stop tokens, else every newline would end it. ``S`` is a stop token only when it is one token.
    ``None`` for a template format (no chat): the decode loop's default, the model's end of sequence. (Here beside
    ``prompt_ids`` rather than in ``data/chat.py``, which the CLI imports for ``--help`` without torch.)
    """
    if chat is None:
        return None
    _, special = chat.end_of_turn_parts()
    closing = base.tokenize(special) if special else []
    return frozenset(eos_ids(base) | (set(closing) if len(closing) == 1 else set()))


def encode(base, examples: list[Example], spec: TaskSpec) -> tuple[list[Encoded], TruncationReport]:
    """Tokenize examples with the spec's truncation; empty targets are an error (nothing to learn from)."""
    report = TruncationReport(examples=len(examples))
    out = []
    for i, ex in enumerate(examples):
        (lead, prompt), target = split_prompt(base, ex.prompt), base.tokenize(ex.target)
        if not target:
            raise SoftpromptsError(f"example {i + 1}: the target {ex.target!r} has no tokens")
        if not prompt:
            raise SoftpromptsError(f"example {i + 1}: the prompt {ex.prompt!r} has no tokens; the first target token "
                                   "needs at least one real token before it (check the template and the data)")
        report.longest_prompt = max(report.longest_prompt, len(prompt))
        report.longest_target = max(report.longest_target, len(target))
        if len(prompt) > spec.max_prompt_tokens:
            prompt = prompt[-spec.max_prompt_tokens :]
            report.prompts_truncated += 1
        if len(target) > spec.max_target_tokens:
            target = target[: spec.max_target_tokens]
            report.targets_truncated += 1
        out.append(Encoded(prompt, target, ex.label, lead))
    return out, report


def truncate_prompt(ids: list[int], spec: TaskSpec) -> list[int]:
    return ids[-spec.max_prompt_tokens :] if len(ids) > spec.max_prompt_tokens else ids


@dataclass
class Batch:
    """Left-padded rows. ``input_ids, attention_mask: [B, T]``; ``labels: [B, L]`` target ids of the last L columns
    (-100 where a column is prompt or padding); ``positions: [L]`` the columns whose logits predict them;
    ``prompts`` / ``targets``: each row's token lists (what an encoder-decoder base reads and writes)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    leads: list[tuple[int, ...]] | None = None  # per row, the tokens in front of the soft prompt (None: none)
    prompts: list[list[int]] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)
    soft_targets: SoftTargets | None = None  # [B, L, k] aligned with labels (rows with a teacher distribution)


def collate(rows: list[Encoded], pad_id: int, device=None) -> Batch:
    """Left-pad ``prompt + target`` rows (``model/padding.prompt_target_rows``): the logits at column ``t`` predict
    the token at column ``t + 1``. Rows with ``soft_targets`` give the batch its ``[B, L, k]`` teacher targets."""
    prompts, targets = [r.prompt_ids for r in rows], [r.target_ids for r in rows]
    ids, mask, labels, positions = prompt_target_rows(prompts, targets, pad_id, device)
    leads = [r.lead_ids for r in rows] if any(r.lead_ids for r in rows) else None
    soft = None
    if any(r.soft_targets is not None for r in rows):
        soft = stack_rows([r.soft_targets for r in rows], [len(t) for t in targets], labels.shape[1], labels.device)
    return Batch(ids, mask, labels, positions, leads, prompts, targets, soft)


def epoch_batches(n: int, lengths: list[int], batch_size: int, seed: int, epoch: int,
                  window: int = 50) -> list[list[int]]:
    """The example indices of every batch of one epoch: a pure function of ``(seed, epoch)`` (exact resume).

    Shuffle, sort by length inside windows of ``window * batch_size`` examples (batches of similar lengths, little
    padding, no global max), cut into batches, shuffle the batch order. The last short batch is dropped when the
    epoch has more than one batch.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    size = max(1, window * batch_size)
    grouped = []
    for start in range(0, n, size):
        grouped += sorted(order[start : start + size], key=lambda i: lengths[i])
    batches = [grouped[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    rng.shuffle(batches)
    return batches

