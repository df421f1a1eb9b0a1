"""Text-level conveniences over the token-level model layer: run or generate with an adapter in one call."""

from __future__ import annotations

import torch

from softprompts import workflow
from softprompts.adapter import Adapter
from softprompts.model.artifacts import Artifact
from softprompts.model.frozen import FrozenBase
from softprompts.model.generation import GREEDY, Sampling
from softprompts.model.placement import place
from softprompts.tasks import split_prompt


def _artifact(adapter: Adapter | Artifact | None) -> Artifact | None:
    return adapter.artifact if isinstance(adapter, Adapter) else adapter


@torch.no_grad()
def next_token_logits(base: FrozenBase, text: str, adapter: Adapter | Artifact | None = None) -> torch.Tensor:
    """Logits ``[V]`` for the token after ``text`` with the adapter injected (on an encoder-decoder base: the
    decoder's first token with ``text`` as the encoder input; ``FrozenBase.next_token_logits``). ``text`` is read as
    every prompt is (``tasks.split_prompt``: the base's BOS first when its tokenizer adds one, the artifact after it
    and after any text before a ``<|virtual|>`` marker)."""
    lead, ids = split_prompt(base, text)
    artifact = _artifact(adapter)
    artifact = place(base, artifact.to(base.device, base.dtype) if artifact is not None else None, lead)
    return base.next_token_logits(torch.tensor([ids], device=base.device), artifact)


def generate(
    base: FrozenBase,
    texts: str | list[str],
    adapter: Adapter | Artifact | None = None,
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    *,
    raw: bool = False,
    template: str | None = None,
    chat: bool = False,
    placement: str | None = None,
    system: str | None = None,
) -> str | list[str]:
    """Decode continuations of ``texts`` (greedy unless ``sampling`` says otherwise): what ``softprompts generate``
    answers for the same TEXT, by the same code (``workflow.generate``).

    Each text goes through the task ``adapter`` recorded: its template's one field (``"great film"`` ->
    ``"Review: great film\\nSentiment:"``; a JSON object fills several), or for a chat adapter the user's message
    rendered with the model's chat template, the soft prompt at the adapter's placement, the answer ending with the
    assistant's turn. ``raw=True`` sends the text as is (``--raw``; an artifact or the bare model always does);
    ``template``, ``chat``, ``placement``, ``system`` render it another way (``--template``, ``--chat``, ...).
    """
    single = isinstance(texts, str)
    rendering = workflow.Rendering(raw=raw, template=template, chat=chat, placement=placement, system=system)
    out = workflow.generate(base, [texts] if single else list(texts), adapter, rendering, max_new_tokens, sampling)
    return out[0] if single else out
