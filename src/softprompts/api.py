"""Text-level conveniences over the token-level model layer: run or generate with an adapter in one call."""

from __future__ import annotations

import torch

from softprompts.adapter import Adapter
from softprompts.model.artifacts import Artifact
from softprompts.model.decode import generate_ids
from softprompts.model.frozen import FrozenBase
from softprompts.model.generation import GREEDY, Sampling


def _artifact(adapter: Adapter | Artifact | None) -> Artifact | None:
    return adapter.artifact if isinstance(adapter, Adapter) else adapter


@torch.no_grad()
def next_token_logits(base: FrozenBase, text: str, adapter: Adapter | Artifact | None = None) -> torch.Tensor:
    """Logits ``[V]`` for the token after ``text`` with the adapter injected (on an encoder-decoder base: the
    decoder's first token with ``text`` as the encoder input; ``FrozenBase.next_token_logits``)."""
    ids = torch.tensor([base.tokenize(text)], device=base.device)
    return base.next_token_logits(ids, _artifact(adapter))


def generate(
    base: FrozenBase,
    texts: str | list[str],
    adapter: Adapter | Artifact | None = None,
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
) -> str | list[str]:
    """Decode continuations of ``texts`` (greedy unless ``sampling`` says otherwise)."""
    single = isinstance(texts, str)
    rows = [base.tokenize(t) for t in ([texts] if single else texts)]
    out = generate_ids(base, rows, _artifact(adapter), max_new_tokens=max_new_tokens, sampling=sampling)
    decoded = [base.tokenizer.decode(ids, skip_special_tokens=True) for ids in out]
    return decoded[0] if single else decoded
