"""The decoder-only family (``AutoModelForCausalLM``: Llama, Qwen2, GPT-2, Gemma3, ...): ``BaseModel``.

What this family answers its own way (``frozen.FrozenBase`` lists the interface):

- a soft prompt at positions ``0..P-1`` attends only to itself, so its per-layer K/V do not depend on the input: it
  is served as the exact KV prefix it produces, computed once (``soft_prompt_to_kv``; an ``OffsetPrompt``'s soft
  prompt too, its offsets still added to the prompt's tokens);
- a row needs ``T + P + N`` positions of one context (prompt, virtual and new tokens);
- the decode loop is ``decode.DecodeBatch`` (one cache, rows of any virtual length side by side, chunked prefill);
- loss and scores are teacher-forced on ``prompt + target`` rows (``score.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from softprompts.model.artifacts import Artifact, KVPrefix, OffsetPrompt, SoftPrompt, VirtualContext
from softprompts.model.decoder import score as decoder_score
from softprompts.model.decoder.decode import DecodeBatch
from softprompts.model.decoder.inject import Prefill, attention_weights, decode_step, forward, hidden_at, hidden_columns
from softprompts.model.frozen import FrozenBase, freeze
from softprompts.model.generation import ContextLengthError, GenerationRequest, GenerationResult
from softprompts.model.probe import cache_keyword, probe_plain_head, probe_shapes


@dataclass
class BaseModel(FrozenBase):
    """A frozen decoder-only LM (``sp.load_base`` builds it; so may you, from a ``PreTrainedModel``)."""

    family = "decoder-only"

    def __post_init__(self) -> None:
        freeze(self.model)
        self.cache_keyword = cache_keyword(self.model)
        self.shapes = probe_shapes(self.model)
        self.plain_head = probe_plain_head(self.model)

    @torch.no_grad()
    def soft_prompt_to_kv(self, prompt: SoftPrompt) -> KVPrefix:
        """Run a soft prompt through the model once: its per-layer K/V (positions ``0..P-1``) is an exact prefix."""
        empty = torch.zeros(1, 0, dtype=torch.long, device=self.device)
        state = forward(self, prompt.to(self.device), empty, use_cache=True)
        keys = [layer.keys[0].clone() for layer in state.cache.layers]  # [H_l, P, D_l]
        values = [layer.values[0].clone() for layer in state.cache.layers]
        return KVPrefix(keys, values)

    def text_to_kv(self, ids: list[int] | torch.Tensor) -> KVPrefix:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.soft_prompt_to_kv(SoftPrompt(self.embed(ids)))

    def serving_artifact(self, artifact) -> Artifact | None:
        artifact = getattr(artifact, "artifact", artifact)
        if artifact is None:
            return None
        artifact = artifact.to(self.device, self.dtype)
        if isinstance(artifact, OffsetPrompt):  # its soft prompt's KV, computed once; the offsets stay per token
            return OffsetPrompt(self.serving_artifact(artifact.prompt), artifact.offsets)
        if isinstance(artifact, SoftPrompt) and artifact.length:  # none: nothing to run (DePT's offsets alone)
            return self.soft_prompt_to_kv(artifact)
        return artifact

    def check_fits(self, prompt_tokens: int, virtual_tokens: int, new_tokens: int,
                   new_what: str = "max_tokens") -> None:
        """Prompt + virtual + new tokens share one context of ``context_limit`` positions."""
        limit, total = self.context_limit, prompt_tokens + virtual_tokens + new_tokens
        if prompt_tokens < 1:
            raise ContextLengthError("the prompt must have at least one token")
        if total > limit:
            raise ContextLengthError(
                f"this model's context limit is {limit} tokens; the request needs {total} "
                f"({prompt_tokens} prompt + {virtual_tokens} virtual + {new_tokens} {new_what}): "
                f"shorten the prompt or lower {new_what}"
            )

    def new_batch(self, stop_default: frozenset[int] | None = None,
                  on_finish: Callable[[GenerationRequest, GenerationResult], None] | None = None,
                  prefill_chunk: int | None = None) -> DecodeBatch:
        return DecodeBatch(self, stop_default, on_finish, prefill_chunk)

    def label_loss_sum(self, artifact: Artifact | None, batch) -> torch.Tensor:
        return decoder_score.label_loss_sum(self, artifact, batch)

    def plain_label_loss_sum(self, artifact: Artifact | None, batch) -> torch.Tensor:
        return decoder_score.plain_label_loss_sum(self, artifact, batch)

    def row_label_scores(self, artifacts, prompts: list[list[int]], verbalizations: list[list[list[int]]],
                         batch_size: int = 16) -> list[torch.Tensor]:
        return decoder_score.row_label_scores(self, artifacts, prompts, verbalizations, batch_size)

    def prefill(self, ids: torch.Tensor, artifact: Artifact | None) -> Prefill:
        return forward(self, artifact, ids, use_cache=True)

    def decode_next(self, state: Prefill, tokens: torch.Tensor) -> Prefill:
        return decode_step(self, state, tokens)

    def next_token_logits(self, ids: torch.Tensor, artifact: Artifact | None) -> torch.Tensor:
        return forward(self, artifact, ids).logits[0, -1]

    def token_logits(self, rows: VirtualContext | Artifact | None, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None,
                     logits_positions: torch.Tensor | None = None,
                     prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        return forward(self, rows, input_ids, attention_mask, logits_positions=logits_positions,
                       prompt_lengths=prompt_lengths).logits

    def hidden_at(self, rows: VirtualContext | Artifact | None, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        return hidden_at(self, rows, input_ids, attention_mask, positions)

    def virtual_attention(self, prefix: KVPrefix, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          columns: tuple[int, int]) -> torch.Tensor:
        """``[L, B, H]``: in each layer, row and head, the attention weight of the row's real-token queries on the
        prefix's key columns ``columns = (start, stop)``, averaged over those queries::

            share[l, b, h] = mean_{t real} sum_{j in columns} softmax_j(q_t k_j / sqrt(d) + mask)[l, b, h]

        from the model's own eager attention (``output_attentions``) on ``input_ids [B, T]`` after ``prefix``."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        weights = attention_weights(self, prefix, input_ids, mask)  # L x [B, H, T, P + T]
        real = mask.to(weights[0].dtype)[:, None, :]  # [B, 1, T]
        start, stop = columns
        shares = [(w[..., start:stop].sum(-1) * real).sum(-1) / real.sum(-1) for w in weights]  # L x [B, H]
        return torch.stack(shares).float()

    def hiding_virtual(self, columns: tuple[int, int], layers: set[int]) -> AbstractContextManager:
        """Inside the block, a KV prefix's key columns ``columns`` are hidden from the attention of ``layers`` (their
        softmax weight exactly 0); the other layers attend to them as before (``inject.hidden_columns``)."""
        return hidden_columns(self.model, columns, layers)


__all__ = ["BaseModel", "freeze"]
