"""A frozen base model: the HF causal LM, its tokenizer, its probed shapes and the primitives methods build on."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from softprompts.model.artifacts import KVPrefix, SoftPrompt
from softprompts.model.inject import forward
from softprompts.model.probe import ModelShapes, cache_keyword, probe_plain_head, probe_shapes


@dataclass
class BaseModel:
    """A frozen ``AutoModelForCausalLM`` (``requires_grad=False``, eval mode) with what adapters need to know.

    ``name`` is what adapters record as their base (an embedded name, HF id or path); ``shapes`` is measured by
    ``probe_shapes``; ``cache_keyword`` is ``cache`` or ``past_key_values`` depending on the transformers version;
    ``plain_head``: the logits are the output embedding of the last hidden state, nothing more (``probe_plain_head``).
    """

    model: PreTrainedModel
    tokenizer: object | None
    name: str
    shapes: ModelShapes = field(init=False)
    cache_keyword: str = field(init=False)
    plain_head: bool = field(init=False)
    is_encoder_decoder: ClassVar[bool] = False  # EncoderDecoderBase (model/encoder_decoder_base.py) says True

    def __post_init__(self) -> None:
        freeze(self.model)
        self.cache_keyword = cache_keyword(self.model)
        self.shapes = probe_shapes(self.model)
        self.plain_head = probe_plain_head(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def pad_id(self) -> int:
        """The token id that fills padded positions: the tokenizer's pad token, else its end-of-text token, else 0.

        Padded positions are always masked out, so the choice never changes an output; it is one rule so that every
        batch (training, evaluation, decoding, PEFT's own runs) is built the same way.
        """
        tokenizer = self.tokenizer
        for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def context_limit(self) -> int:
        """Positions the model was built for (virtual + prompt + generated tokens): ``max_position_embeddings``,
        ``n_positions`` or ``max_sequence_length`` from its config, 2048 when it names none."""
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.model.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids (``[T] -> [T, hidden]``), including any scaling the model applies."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"base model {self.name!r} has no tokenizer; pass token ids instead of text")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    @torch.no_grad()
    def soft_prompt_to_kv(self, prompt: SoftPrompt) -> KVPrefix:
        """Run a soft prompt through the model once: its per-layer K/V (positions ``0..P-1``) is an exact prefix."""
        empty = torch.zeros(1, 0, dtype=torch.long, device=self.device)
        state = forward(self, prompt.to(self.device), empty, use_cache=True)
        return _cache_to_prefix(state.cache)

    @torch.no_grad()
    def text_to_kv(self, ids: list[int] | torch.Tensor) -> KVPrefix:
        """The KV a real text leaves in the cache (a prefix that equals having the text in front)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.soft_prompt_to_kv(SoftPrompt(self.embed(ids)))

    def weights_fingerprint(self) -> str:
        """A cheap hash of a sample of the embedding matrix: tells two checkpoints of one architecture apart."""
        weight = self.model.get_input_embeddings().weight.detach()
        rows = weight[:: max(1, weight.shape[0] // 64)][:64, :64].float().cpu()
        return hashlib.sha256(rows.mul(1e3).round().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _cache_to_prefix(cache) -> KVPrefix:
    keys = [layer.keys[0].clone() for layer in cache.layers]  # [H_l, P, D_l]
    values = [layer.values[0].clone() for layer in cache.layers]
    return KVPrefix(keys, values)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
