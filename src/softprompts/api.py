"""Text-level conveniences over the token-level model layer: run or generate with an adapter in one call."""

from __future__ import annotations

import torch

from softprompts.adapter import Adapter
from softprompts.model import encoder_decoder
from softprompts.model.artifacts import Artifact
from softprompts.model.base import BaseModel
from softprompts.model.decode import generate_ids
from softprompts.model.generation import GREEDY, Sampling
from softprompts.model.inject import VirtualContext, forward


def _artifact(adapter: Adapter | Artifact | None) -> Artifact | None:
    return adapter.artifact if isinstance(adapter, Adapter) else adapter


@torch.no_grad()
def next_token_logits(base: BaseModel, text: str, adapter: Adapter | Artifact | None = None) -> torch.Tensor:
    """Logits ``[V]`` for the token after ``text`` with the adapter injected (on an encoder-decoder base: the
    decoder's first token with ``text`` as the encoder input)."""
    ids = torch.tensor([base.tokenize(text)], device=base.device)
    if base.is_encoder_decoder:
        start = torch.tensor([[base.decoder_start_id]], device=base.device)
        ctx = VirtualContext.broadcast(_artifact(adapter), 1)
        return encoder_decoder.forward(base, ctx, ids, None, start, None).logits[0, -1]
    return forward(base, _artifact(adapter), ids).logits[0, -1]


def generate(
    base: BaseModel,
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
