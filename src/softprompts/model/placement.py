"""Placement: a soft prompt after some real tokens instead of in front of everything, with no new injection path.

A row whose prompt is ``lead`` (``k`` tokens) + virtual tokens + ``rest`` is the row ``rest`` with the soft prompt
``[e(lead_1), ..., e(lead_k), E_1, ..., E_P]`` in front: the same embeddings at the same positions (``0..k-1`` for
the lead, ``k..k+P-1`` for the virtual tokens, ``k+P..`` for the rest), so the model computes exactly what it computes
for the text with the soft prompt at that point. The lead's embeddings are the frozen model's (gradients reach only
``E``). A lead shared by every row (fixed text: a template's opening, a system turn) makes one artifact for all; its
KV can then be computed once and served like any prefix (``BaseModel.soft_prompt_to_kv``).

A KV prefix sits in front of everything by construction: placing one after a lead is an error, not a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from softprompts.errors import SoftpromptsError
from softprompts.model.artifacts import Artifact, KVPrefix, SoftPrompt
from softprompts.model.inject import VirtualContext


class PlacementError(SoftpromptsError):
    """A placement that cannot be made (a KV prefix after real tokens)."""


def place(base, artifact: Artifact | None, lead: Sequence[int]) -> Artifact | None:
    """``artifact`` placed after the tokens ``lead``: ``SoftPrompt([e(lead); E])`` (``[k + P, hidden]``); the
    artifact itself for an empty lead; ``SoftPrompt(e(lead))`` for no artifact (the bare model reads the lead)."""
    if not lead:
        return artifact
    if isinstance(artifact, KVPrefix):
        raise PlacementError("a KV prefix (prefix tuning, deep prompts) sits in front of everything: it cannot be "
                             "placed after text; remove the placement (or the <|virtual|> marker) or use prompt "
                             "tuning / P-tuning")
    embeds = base.embed(torch.tensor(list(lead), dtype=torch.long))  # [k, hidden], frozen
    if artifact is None:
        return SoftPrompt(embeds)
    return SoftPrompt(torch.cat([embeds.to(artifact.embeds.dtype), artifact.embeds.to(embeds.device)], dim=0))


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


__all__ = ["PlacementError", "place", "place_rows"]
