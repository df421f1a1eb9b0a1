"""Placement: a soft prompt after some real tokens instead of in front of everything, with no new injection path.

A row whose prompt is ``lead`` (``k`` tokens) + virtual tokens + ``rest`` is the row ``rest`` with the soft prompt
``[e(lead_1), ..., e(lead_k), E_1, ..., E_P]`` in front: the same embeddings at the same positions (``0..k-1`` for
the lead, ``k..k+P-1`` for the virtual tokens, ``k+P..`` for the rest), so the model computes exactly what it computes
for the text with the soft prompt at that point. The lead's embeddings are the frozen model's (gradients reach only
``E``). A lead shared by every row (fixed text: a template's opening, a system turn) makes one artifact for all; its
KV can then be computed once and served like any prefix (``BaseModel.soft_prompt_to_kv``).

A KV prefix sits in front of everything by construction: placing one after a lead is an error, not a no-op.

An ``OffsetPrompt`` (DePT) places its soft prompt so and keeps its offsets: the lead belongs to the soft part, and
the offsets still start at the first real token after the virtual positions (the lead gets none).

The start of a sequence (``sequence_start``): a base whose tokenizer puts BOS in front of every text
(``FrozenBase.bos_lead``: Gemma, Llama) was trained with BOS at position 0, and many of its heads attend there (the
"attention sink"); a soft prompt at position 0 would take BOS's place. So every rendered prompt of such a base reads
BOS first, exactly once, and it is the first token of the row's lead: the soft prompt follows it, and a lead of
fixed text (BOS alone, or BOS + a template's opening) is served once per adapter as [BOS + soft prompt] KV like any
lead. A chat template that writes BOS itself is not given a second one. A KV prefix occupies positions ``0..P-1``
(its RoPE positions are baked in), so nothing can precede it and BOS after it would sit mid-sequence, where the model
never saw it: a KV prefix stands in for the sequence's start, the BOS lead is dropped in front of it (``place``), and
the KV that starts one from real text is computed with BOS first (``start_ids``), so BOS is inside the prefix: the
KV of a real prefill of ``[BOS] + text`` in front of ``x`` == the model on ``[BOS] + text + x``. A soft prompt's
served KV, computed after its lead, holds BOS the same way. Bases whose tokenizer adds no BOS (SmolLM2) are
unchanged: their lead is what it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from softprompts.errors import SoftpromptsError
from softprompts.model.artifacts import Artifact, KVPrefix, OffsetPrompt, SoftPrompt, VirtualContext


class PlacementError(SoftpromptsError):
    """A placement that cannot be made (a KV prefix after real tokens)."""


def sequence_start(base, lead: Sequence[int], ids: Sequence[int]) -> tuple[tuple[int, ...], list[int]]:
    """``(lead, ids)`` of a rendered prompt tokenized without special tokens, the base's BOS put first when its
    tokenizer adds one (module docstring): in front of the lead, or, with no lead, moved out of ``ids`` when the text
    already starts with it (a chat template that writes ``<bos>``) and made the lead. Unchanged on other bases."""
    start, lead, ids = base.bos_lead, tuple(lead), list(ids)
    if not start or lead[: len(start)] == start:
        return lead, ids
    if not lead and tuple(ids[: len(start)]) == start:
        return start, ids[len(start):]
    return start + lead, ids


def beyond_start(base, lead: Sequence[int]) -> tuple[int, ...]:
    """The tokens of ``lead`` after the sequence's start (the base's BOS): the text a prompt puts in front of the
    virtual tokens (``()`` when the lead is BOS alone, which a KV prefix stands in for)."""
    start, lead = base.bos_lead, tuple(lead)
    return lead[len(start):] if start and lead[: len(start)] == start else lead


def start_ids(base, ids: Sequence[int]) -> list[int]:
    """Token ids of a text that begins a sequence (its KV is computed from position 0: a prefix's real-text start,
    few-shot demonstrations, a cartridge teacher's context): the base's BOS first, unless they start with it."""
    lead, rest = sequence_start(base, (), ids)
    return [*lead, *rest]


def read_lead(base, artifact: Artifact | None, lead: Sequence[int]) -> tuple[int, ...]:
    """The tokens of ``lead`` a row with ``artifact`` reads: ``lead``, or ``beyond_start(lead)`` in front of a KV
    prefix, which stands in for the sequence's start (what usage counts: the same on both serving engines)."""
    return beyond_start(base, lead) if isinstance(artifact, KVPrefix) else tuple(lead)


def place(base, artifact: Artifact | None, lead: Sequence[int]) -> Artifact | None:
    """``artifact`` placed after the tokens ``lead``: ``SoftPrompt([e(lead); E])`` (``[k + P, hidden]``); the
    artifact itself for an empty lead; ``SoftPrompt(e(lead))`` for no artifact (the bare model reads the lead). A KV
    prefix after the base's BOS alone is the KV prefix itself (it stands in for the sequence's start)."""
    if not lead:
        return artifact
    if isinstance(artifact, OffsetPrompt):
        return OffsetPrompt(place(base, artifact.prompt, lead), artifact.offsets)  # the lead gets no offset
    if isinstance(artifact, KVPrefix) and not beyond_start(base, lead):
        return artifact
    if isinstance(artifact, KVPrefix):
        raise PlacementError("a KV prefix (prefix tuning, deep prompts) sits in front of everything: it cannot be "
                             "placed after text; remove the placement (or the <|virtual|> marker) or use prompt "
                             "tuning / P-tuning")
    embeds = base.embed(torch.tensor(list(lead), dtype=torch.long))  # [k, hidden], frozen
    if artifact is None:
        return SoftPrompt(embeds)
    return SoftPrompt(torch.cat([embeds.to(artifact.embeds.dtype), artifact.embeds.to(embeds.device)], dim=0))


def placed_length(base, artifact: Artifact | None, lead: Sequence[int]) -> int:
    """Virtual positions of ``place(base, artifact, lead)`` without computing it (a request's plan checks the
    context with it): ``k + P`` after a lead of ``k`` tokens, ``P`` for a KV prefix (after nothing or the base's BOS
    alone), ``k`` for no artifact. Raises ``place``'s ``PlacementError`` for a KV prefix after text."""
    if isinstance(artifact, KVPrefix):
        if beyond_start(base, lead):
            place(base, artifact, lead)  # raises: the one wording of the rule
        return artifact.length
    return len(lead) + (artifact.length if artifact is not None else 0)


def place_rows(base, artifact: Artifact | None, leads: Sequence[Sequence[int]] | None
               ) -> VirtualContext | Artifact | None:
    """What ``forward`` takes for rows with their own ``leads``: the artifact itself when no row has one, one placed
    artifact when all rows share the same lead, else a ``VirtualContext`` with each row's placed artifact."""
    if not leads or not any(leads):
        return artifact
    distinct = {tuple(lead) for lead in leads}
    if len(distinct) == 1:
        return place(base, artifact, leads[0])
    placed = {lead: place(base, artifact, lead) for lead in distinct}
    return VirtualContext.from_rows([placed[tuple(lead)] for lead in leads])


__all__ = ["PlacementError", "beyond_start", "place", "place_rows", "placed_length", "read_lead", "sequence_start",
           "start_ids"]
