"""What every frozen base answers, whatever its family: the interface the floors above ask instead of branching.

A model family is a type, not a flag. ``FrozenBase`` holds what all families share (the HF model, its tokenizer,
probed shapes, ``pad_id``, ``context_limit``, embeddings, fingerprint) and declares what each family answers its own
way; ``BaseModel`` (decoder-only, ``model/decoder/``) and ``EncoderDecoderBase`` (T5, BART families,
``model/encoder_decoder/``) implement every one of them:

    serving_artifact(a)            the form an artifact is served in (a soft prompt -> its exact KV where it has one)
    check_fits(T, P, N, what)      the context rule: T prompt + P virtual + N new tokens
    new_batch(stop, on_finish)     the decode loop the scheduler drives (``decode_loop.DecodeLoop``)
    label_loss_sum(a, batch)       the training loss of a batch (sum over target tokens)
    row_label_scores(a, x, ys, b)  log p(y | a, x) summed over each candidate's tokens (rank classification)
    prefill(ids, a) / decode_next  the first forward of a generation and one more token (latency measurement)
    next_token_logits(ids, a)      the logits ``[V]`` of the first generated token
    text_to_kv(ids)                the KV prefix a real text leaves (prefix tuning's real-text start)

What a family cannot do is declared, not discovered: ``unsupported`` maps a feature (``"compile"``, ...) to the reason
the user is told; ``supports(feature)`` asks, ``require(feature, **fields)`` refuses with that reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from softprompts.errors import SoftpromptsError
from softprompts.model.artifacts import Artifact, KVPrefix, VirtualContext
from softprompts.model.generation import ContextLengthError, GenerationRequest, GenerationResult
from softprompts.model.placement import place
from softprompts.model.probe import ModelShapes
from softprompts.model.quantize import keep_differentiable, quantization_of

FEATURES = ("compile", "gradient_checkpointing", "prompt_logprobs", "peft_baseline", "wrap", "distillation",
            "vllm_engine", "layer_probe")


WEIGHTS_FORM = "w2:"  # weights_fingerprint's form (bfloat16-rounded sample); older files hold the legacy form


class UnsupportedFeature(SoftpromptsError):
    """A feature this base model's family does not support (the message says why and what to do instead)."""


@dataclass
class FrozenBase:
    """A frozen HF model (``requires_grad=False``, eval mode) with what adapters need to know.

    ``name`` is what adapters record as their base (an embedded name, HF id or path); ``shapes`` is measured by the
    family's probe; ``cache_keyword`` is ``cache`` or ``past_key_values`` depending on the transformers version;
    ``plain_head``: the logits are the output embedding of the last hidden state, nothing more.
    """

    model: PreTrainedModel
    tokenizer: object | None
    name: str
    shapes: ModelShapes = field(init=False)
    cache_keyword: str = field(init=False)
    plain_head: bool = field(init=False)
    family: ClassVar[str] = ""
    unsupported: ClassVar[dict[str, str]] = {}  # feature -> the refusal, formatted with name= and require's fields
    is_encoder_decoder: ClassVar[bool] = False  # for code that must tell the families apart; prefer the methods

    # -- shared by every family -----------------------------------------------------------------------------------
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
        """Positions the model was built for: ``max_position_embeddings``, ``n_positions`` or
        ``max_sequence_length`` from its config, 2048 when it names none (what counts against it: ``check_fits``)."""
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.model.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    @property
    def vocab_size(self) -> int:
        """How many token ids a request may send: the embedding's rows, and no more than the tokenizer knows
        (an id past it could not be decoded back to text)."""
        rows = self.model.get_input_embeddings().weight.shape[0]
        return min(rows, len(self.tokenizer)) if self.tokenizer is not None else rows

    def check_token_ids(self, ids: Sequence[int], where: str) -> None:
        """Token ids a client sent must be in ``vocab_size``; the error names the first that is not
        (``where[i]``)."""
        for i, token in enumerate(ids):
            if not 0 <= token < self.vocab_size:
                raise SoftpromptsError(f"{where}[{i}]: token id {token} is outside the model's vocabulary (0 to "
                                       f"{self.vocab_size - 1})")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids (``[T] -> [T, hidden]``), including any scaling the model applies."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"base model {self.name!r} has no tokenizer; pass token ids instead of text")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    @property
    def bos_lead(self) -> tuple[int, ...]:
        """``(bos_token_id,)`` when this base's tokenizer puts its BOS in front of every text it encodes (Gemma,
        Llama: what the model was trained to read at position 0), else ``()`` (GPT-2, Qwen2, SmolLM2).

        Read from what the tokenizer does, ``tokenizer("a")`` against ``tokenizer("a", add_special_tokens=False)``,
        not from its ``add_bos_token`` attribute: transformers 5 drops that attribute when it reloads a saved
        tokenizer (the ``tokenizer.json`` post-processor keeps the behaviour). Texts are tokenized without special
        tokens everywhere (``tokenize``); ``placement.sequence_start`` puts this BOS back, once, in front of each
        rendered prompt. Read once per tokenizer (every prompt asks: ``tasks.split_prompt``)."""
        tokenizer = self.tokenizer
        cached = self.__dict__.get("_bos_lead")
        if cached is None or cached[0] is not tokenizer:
            cached = self.__dict__["_bos_lead"] = (tokenizer, _bos_lead(tokenizer))
        return cached[1]

    @property
    def quantization(self) -> str | None:
        """How the frozen weights are quantized (``nf4``, ``int8``, ...; ``model/quantize.py``), ``None`` if not."""
        return quantization_of(self.model)

    def weights_fingerprint(self) -> str:
        """A cheap hash of a sample of the embedding matrix (64 x 64 values): tells two checkpoints of one
        architecture apart. The sample is rounded to bfloat16 first, so one checkpoint loaded in float32 or bfloat16
        (``--dtype auto``) has one fingerprint (float16's double rounding may differ); ``w2:`` marks this form.
        A quantized base adds its quantization (``...-nf4``): its other weights differ from the checkpoint's."""
        bits = self._embedding_sample().to(torch.bfloat16).view(torch.int16)
        digest = WEIGHTS_FORM + hashlib.sha256(bits.numpy().tobytes()).hexdigest()[:16]
        return f"{digest}-{self.quantization}" if self.quantization else digest

    def legacy_weights_fingerprint(self) -> str:
        """The form files written before ``w2:`` hold (the float32 sample to 1e-3): read, never written, so those
        adapters still match the float32 base they were made on."""
        rows = self._embedding_sample()
        digest = hashlib.sha256(rows.mul(1e3).round().to(torch.int64).numpy().tobytes()).hexdigest()[:16]
        return f"{digest}-{self.quantization}" if self.quantization else digest

    def _embedding_sample(self) -> torch.Tensor:
        weight = self.model.get_input_embeddings().weight.detach()
        return weight[:: max(1, weight.shape[0] // 64)][:64, :64].float().cpu()

    # -- capabilities ---------------------------------------------------------------------------------------------
    def supports(self, feature: str) -> bool:
        if feature not in FEATURES:
            raise ValueError(f"unknown feature {feature!r}; known: {', '.join(FEATURES)}")
        return feature not in self.unsupported

    def require(self, feature: str, **fields: str) -> None:
        """Raise ``UnsupportedFeature`` (the family's reason, formatted with ``name`` and ``fields``) unless this
        base supports ``feature``."""
        if not self.supports(feature):
            raise UnsupportedFeature(self.unsupported[feature].format(name=self.name, **fields))

    # -- rules written once on top of the family's answers ------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        """The rule for a generation request, everywhere: ``max_new_tokens >= 0`` and ``check_fits``."""
        if request.max_new_tokens < 0:
            raise ContextLengthError(f"max_new_tokens must be >= 0, got {request.max_new_tokens}")
        virtual = request.artifact.length if request.artifact is not None else 0
        self.check_fits(len(request.prompt_ids), virtual, request.max_new_tokens)

    def served(self, artifact, lead: Sequence[int] = ()) -> Artifact | None:
        """``artifact`` (an Adapter, an artifact or None) placed after ``lead`` (``placement.place``), in the form it
        is served in (``serving_artifact``): what a row with that lead runs with. Callers cache it per adapter."""
        raw = getattr(artifact, "artifact", artifact)
        raw = raw.to(self.device, self.dtype) if raw is not None else None
        return self.serving_artifact(place(self, raw, lead))

    # -- what each family answers (model/decoder/base.py, model/encoder_decoder/base.py) -------------------------
    def serving_artifact(self, artifact) -> Artifact | None:
        """An Adapter, artifact or None -> the artifact rows run with (on this device and dtype)."""
        raise NotImplementedError

    def check_fits(self, prompt_tokens: int, virtual_tokens: int, new_tokens: int,
                   new_what: str = "max_tokens") -> None:
        """Raise ``ContextLengthError`` naming the limit when a row does not fit, or the prompt is empty."""
        raise NotImplementedError

    def new_batch(self, stop_default: frozenset[int] | None = None,
                  on_finish: Callable[[GenerationRequest, GenerationResult], None] | None = None,
                  prefill_chunk: int | None = None):
        """An empty decode loop (``decode_loop.DecodeLoop``) for this base."""
        raise NotImplementedError

    def label_loss_sum(self, artifact: Artifact | None, batch) -> torch.Tensor:
        """The summed target-token cross-entropy of a training batch (``tasks.Batch``); keeps the artifact's graph."""
        raise NotImplementedError

    def plain_label_loss_sum(self, artifact: Artifact | None, batch) -> torch.Tensor:
        """``label_loss_sum`` as one graph a compiler can trace (``training.step.compiled_loss``): the family's model
        head and ``cross_entropy`` with no Python loop over chunks. Default: ``label_loss_sum`` itself."""
        return self.label_loss_sum(artifact, batch)

    def row_label_scores(self, artifacts, prompts: list[list[int]], verbalizations: list[list[list[int]]],
                         batch_size: int = 16) -> list[torch.Tensor]:
        """Per prompt ``[C_i]`` summed log-probabilities of its candidates; ``artifacts`` served, shared or per row."""
        raise NotImplementedError

    def prefill(self, ids: torch.Tensor, artifact: Artifact | None):
        """The first forward of a generation of ``ids [B, T]``: a state whose ``logits [B, t, V]`` give token one."""
        raise NotImplementedError

    def decode_next(self, state, tokens: torch.Tensor):
        """``state`` continued by one token per row (``tokens [B]``)."""
        raise NotImplementedError

    def next_token_logits(self, ids: torch.Tensor, artifact: Artifact | None) -> torch.Tensor:
        """Logits ``[V]`` of the first token generated after ``ids [1, T]`` with ``artifact`` injected."""
        return self.prefill(ids, artifact).logits[0, -1]

    def text_to_kv(self, ids: list[int] | torch.Tensor) -> KVPrefix:
        """The KV prefix a real text leaves (having the text in front, as a prefix)."""
        raise NotImplementedError

    def token_logits(self, rows: VirtualContext | Artifact | None, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None,
                     logits_positions: torch.Tensor | None = None,
                     prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` of ``input_ids [B, T]`` read as one causal sequence per row, with ``rows`` injected
        (a ``VirtualContext``, or one artifact for every row): the logits of the real positions only, or of
        ``logits_positions [K]`` of them (``[B, K, V]``). Prompt log-probabilities, a wrapped model's logits and a
        teacher's targets read it; a family that reads its input otherwise declares ``token_logits`` unsupported.
        ``prompt_lengths [B]``: each row's real tokens that are prompt (embedding offsets stop there; ``None``: all)."""
        self.require("token_logits")
        raise NotImplementedError

    def hidden_at(self, rows: VirtualContext | Artifact | None, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """The final hidden states ``[B, K, hidden]`` at the real positions ``positions [K]`` (what the output head
        projects), read as ``token_logits`` reads the input."""
        self.require("token_logits")
        raise NotImplementedError

    def virtual_attention(self, prefix: KVPrefix, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          columns: tuple[int, int]) -> torch.Tensor:
        """``[L, B, H]`` share of each layer's attention (per row and head, averaged over the real-token queries) on
        the key columns ``columns`` of the KV prefix ``prefix`` (``softprompts explain``)."""
        self.require("layer_probe")
        raise NotImplementedError

    def hiding_virtual(self, columns: tuple[int, int], layers: set[int]) -> AbstractContextManager:
        """A context in which the KV prefix's key columns ``columns`` are hidden from the attention of ``layers``
        (the layer ablation of ``softprompts explain``)."""
        self.require("layer_probe")
        raise NotImplementedError


def _bos_lead(tokenizer) -> tuple[int, ...]:
    """``FrozenBase.bos_lead`` of ``tokenizer``: ``(bos,)`` when encoding a text puts BOS in front, else ``()``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos is None:
        return ()
    added = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return (int(bos),) if added[:1] == [bos] and plain[:1] != [bos] else ()


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, no parameter trains; quantized layers kept on their differentiable path (eval mode must not make
    bitsandbytes treat them as inference-only: ``quantize.keep_differentiable``), since gradients still flow
    through them to the adapter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return keep_differentiable(model)


__all__ = ["FEATURES", "FrozenBase", "UnsupportedFeature", "freeze"]
