"""A frozen encoder-decoder base (``AutoModelForSeq2SeqLM``: T5, BART families) with its probed KV layout.

Shapes are measured, as for decoder-only models: one forward of ``[1, 2]`` encoder and decoder tokens with every
encoder self-attention handed an empty cache (``encoder_decoder.encoder_prefix(..., capture=)``) reads, per
layer, the key/value heads ``H_l`` and head dim ``D_l`` of the encoder's self-attention, the decoder's
self-attention and its cross-attention, in the ``KVLayout`` order (``forward.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from softprompts.model.artifacts import Artifact, KVPrefix, VirtualContext
from softprompts.model.encoder_decoder import score as encoder_decoder_score
from softprompts.model.encoder_decoder.batch import EncoderDecoderBatch
from softprompts.model.encoder_decoder.forward import (
    DecoderState,
    EncoderDecoderError,
    KVLayout,
    decode_more,
    encoder_layer_count,
    encoder_prefix,
    forward,
)
from softprompts.model.frozen import FrozenBase, freeze
from softprompts.model.generation import ContextLengthError, GenerationRequest, GenerationResult
from softprompts.model.placement import PlacementError, place
from softprompts.model.probe import ModelShapes, cache_keyword

_DECODER_ONLY_TRAINING = ("{flag} runs on decoder-only models; {name} is an encoder-decoder model: train it "
                          "without {flag}")


def _layer_shapes(layers) -> tuple[list[int], list[int]]:
    return [int(layer.keys.shape[1]) for layer in layers], [int(layer.keys.shape[-1]) for layer in layers]


@dataclass
class EncoderDecoderBase(FrozenBase):
    """A frozen encoder-decoder LM: the encoder reads the prompt, the decoder writes the target.

    ``layout``: how a KV prefix's layers split into encoder self, decoder self and cross-attention parts;
    ``decoder_start_id``: the token every decoder input starts with (the model's ``decoder_start_token_id``).
    Training and scoring use HF's own head (``plain_head`` is false: T5 scales tied logits). A soft prompt in front
    of a bidirectional encoder has no input-independent KV (every encoder state depends on the whole input): it is
    served as it is. The decoder writes every target and candidate with its end-of-sequence token
    (``score.py``).
    """

    family = "encoder-decoder"
    is_encoder_decoder = True
    unsupported = {
        "layer_probe": ("softprompts explain measures a KV prefix in one decoder stack (attention shares, a per-layer "
                        "ablation); {name} is an encoder-decoder model, whose soft prompt has no input-independent KV "
                        "and whose prefix spans three attention kinds: explain an adapter of a decoder-only model"),
        "compile": _DECODER_ONLY_TRAINING,
        "gradient_checkpointing": _DECODER_ONLY_TRAINING,
        "prompt_logprobs": ("echo with logprobs scores the prompt's own tokens, which an encoder-decoder model reads "
                            "with its encoder and never predicts; send echo without logprobs"),
        "peft_baseline": ("--baseline peft runs on decoder-only models; {name} is an encoder-decoder model (PEFT "
                          "puts its seq2seq prefixes in the decoder only, and the LoRA ceiling is not wired for it): "
                          "drop --baseline peft"),
        "distillation": ("context distillation (cartridges) trains a KV prefix on a decoder-only model's chat "
                         "conversations; {name} is an encoder-decoder model: use a decoder-only model"),
        "vllm_engine": ("serve --engine vllm serves decoder-only models (adapters reach vLLM as prompt_embeds and KV "
                        "placeholders at the start of the prompt); {name} is an encoder-decoder model: serve it with "
                        "the default engine (softprompts serve)"),
        "token_logits": ("{name} is an encoder-decoder model: it reads its input with its encoder and predicts only "
                         "its decoder's tokens, so there are no logits of the input's own tokens"),
        "wrap": ("sp.wrap takes decoder-only models (its logits are aligned with input_ids); {name} is an "
                 "encoder-decoder model: train it with softprompts train / sp.train"),
    }
    layout: KVLayout = field(init=False)

    def __post_init__(self) -> None:
        freeze(self.model)
        self.cache_keyword = cache_keyword(self.model)
        self.plain_head = False
        self.shapes, self.layout = probe_encoder_decoder(self)

    @property
    def decoder_start_id(self) -> int:
        for source in (self.model.generation_config, self.model.config):
            start = getattr(source, "decoder_start_token_id", None)
            if start is not None:
                return int(start)
        return self.pad_id

    def serving_artifact(self, artifact) -> Artifact | None:
        artifact = getattr(artifact, "artifact", artifact)
        return None if artifact is None else artifact.to(self.device, self.dtype)

    def check_fits(self, prompt_tokens: int, virtual_tokens: int, new_tokens: int,
                   new_what: str = "max_tokens") -> None:
        """The encoder reads virtual + prompt tokens, the decoder virtual + new tokens: each within the context
        (BART's ``max_position_embeddings``; T5's relative positions have no hard limit, its ``n_positions`` is what
        it was trained at)."""
        limit = self.context_limit
        if prompt_tokens < 1:
            raise ContextLengthError("the prompt must have at least one token")
        for what, tokens in (("prompt", prompt_tokens), (new_what, new_tokens)):
            if tokens + virtual_tokens > limit:
                raise ContextLengthError(f"this model's context limit is {limit} tokens; the {what} side needs "
                                         f"{tokens + virtual_tokens} ({virtual_tokens} virtual + {tokens} {what}): "
                                         "lower it")

    def new_batch(self, stop_default: frozenset[int] | None = None,
                  on_finish: Callable[[GenerationRequest, GenerationResult], None] | None = None,
                  prefill_chunk: int | None = None) -> EncoderDecoderBatch:
        return EncoderDecoderBatch(self, stop_default, on_finish, prefill_chunk)

    def label_loss_sum(self, artifact: Artifact | None, batch) -> torch.Tensor:
        """The encoder reads each row's prompt (its lead placed in front of the soft prompt), the decoder writes its
        target then EOS. ``batch.prompts`` / ``batch.targets``: the rows' token lists (``tasks.collate``)."""
        if getattr(batch, "soft_targets", None) is not None:
            self.require("distillation")
        if batch.leads and any(batch.leads):
            if len({tuple(lead) for lead in batch.leads}) > 1:
                raise PlacementError("rows of one batch with different text before the soft prompt on an "
                                     "encoder-decoder model; give them one lead")
            artifact = place(self, artifact, batch.leads[0])
        return encoder_decoder_score.loss_sum(self, artifact, batch.prompts, batch.targets)

    def row_label_scores(self, artifacts, prompts: list[list[int]], verbalizations: list[list[list[int]]],
                         batch_size: int = 16) -> list[torch.Tensor]:
        pairs = [(i, c) for i in range(len(prompts)) for c in range(len(verbalizations[i]))]
        rows = [artifacts[i] for i, _ in pairs] if isinstance(artifacts, list) else [artifacts] * len(pairs)
        totals = encoder_decoder_score.target_logprobs(self, rows, [prompts[i] for i, _ in pairs],
                                                       [verbalizations[i][c] for i, c in pairs], batch_size)
        scores = [torch.zeros(len(v)) for v in verbalizations]
        for (i, c), total in zip(pairs, totals, strict=True):
            scores[i][c] = total
        return scores

    def prefill(self, ids: torch.Tensor, artifact: Artifact | None) -> DecoderState:
        """The encoder reads ``ids [B, T]``; the decoder reads its start token."""
        start = torch.full((ids.shape[0], 1), self.decoder_start_id, dtype=torch.long, device=self.device)
        return forward(self, VirtualContext.broadcast(artifact, ids.shape[0]), ids, None, start, None,
                       use_cache=True)

    def decode_next(self, state: DecoderState, tokens: torch.Tensor) -> DecoderState:
        return decode_more(self, state, tokens[:, None])

    def next_token_logits(self, ids: torch.Tensor, artifact: Artifact | None) -> torch.Tensor:
        start = torch.tensor([[self.decoder_start_id]], device=self.device)
        return forward(self, VirtualContext.broadcast(artifact, 1), ids, None, start, None).logits[0, -1]

    @torch.no_grad()
    def text_to_kv(self, ids: list[int] | torch.Tensor) -> KVPrefix:
        """The KV a text leaves in each part: the encoder's self-attention reading it, the decoder's self-attention
        reading it (over the encoder's output of the same text) and the cross-attention keys/values of that output.
        Each part has ``len(ids)`` positions (the real-text start of prefix tuning, ``methods/init.py``)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)[None]  # [1, P]
        encoder_caches, dec_self, cross = run_with_caches(self, ids, ids)
        layers = [c.layers[-1] for c in encoder_caches]  # each holds its own layer index only
        layers += list(dec_self.layers) + list(cross.layers)
        return KVPrefix([layer.keys[0].clone() for layer in layers], [layer.values[0].clone() for layer in layers])


def run_with_caches(base, encoder_ids: torch.Tensor, decoder_ids: torch.Tensor):
    """One cached forward: ``(encoder per-layer caches, decoder self-attention cache, cross-attention cache)``."""
    captured: list = []
    with encoder_prefix(base.model, None, capture=captured):
        out = base.model(input_ids=encoder_ids, decoder_input_ids=decoder_ids, use_cache=True)
    cache = getattr(out, base.cache_keyword)
    return captured, cache.self_attention_cache, cache.cross_attention_cache


@torch.no_grad()
def probe_encoder_decoder(base: EncoderDecoderBase) -> tuple[ModelShapes, KVLayout]:
    """``ModelShapes`` whose per-layer heads/dims follow the ``KVLayout`` order, and the layout."""
    model = base.model
    ids = torch.zeros(1, 2, dtype=torch.long, device=base.device)
    encoder, dec_self, cross = run_with_caches(base, ids, ids)
    enc_layers = [c.layers[-1] for c in encoder]
    if len(enc_layers) != encoder_layer_count(model) or len(dec_self.layers) != len(cross.layers):
        raise EncoderDecoderError(f"{type(model).__name__}: the probe saw {len(enc_layers)} encoder, "
                                  f"{len(dec_self.layers)} decoder and {len(cross.layers)} cross-attention layers")
    heads, dims = [], []
    for part in (enc_layers, dec_self.layers, cross.layers):
        h, d = _layer_shapes(part)
        heads += h
        dims += d
    layout = KVLayout(len(enc_layers), len(dec_self.layers))
    embeddings = model.get_input_embeddings().weight
    shapes = ModelShapes(
        model_type=str(model.config.model_type), num_layers=layout.total, hidden_size=int(embeddings.shape[1]),
        vocab_size=int(embeddings.shape[0]), kv_heads=tuple(heads), head_dims=tuple(dims),
        dtype=str(embeddings.dtype).removeprefix("torch."), encoder_layers=layout.encoder_layers)
    return shapes, layout


__all__ = ["EncoderDecoderBase", "probe_encoder_decoder", "run_with_caches"]
