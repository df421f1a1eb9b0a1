"""Import a Hugging Face PEFT prompt-learning adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

Supported: ``PROMPT_TUNING`` and ``P_TUNING`` (-> ``SoftPrompt``) and ``PREFIX_TUNING`` with or without projection
(-> ``KVPrefix``), for decoder-only models (``num_transformer_submodules == 1``). PEFT saves all three collapsed as
one tensor ``prompt_embeddings``: ``[P, token_dim]`` for the soft prompts (the P-tuning encoder already applied) and
``[P, num_layers * 2 * token_dim]`` for prefixes (the projection MLP already applied), where for prefixes
``token_dim = H * D`` with ``H = num_attention_heads`` the key/value heads (GQA) -- see ``peft_export`` for the layout.

Everything is read as JSON and safetensors (never pickle: ``adapter_model.bin`` is refused), validated against the
base model's probed shapes, and every problem raises ``PeftImportError`` saying what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from softprompts.adapter import Adapter
from softprompts.codec import AdapterError, AdapterRecord, decode_adapter
from softprompts.errors import SoftpromptsError
from softprompts.files import read_json
from softprompts.interop.peft_export import METADATA_KEY, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from softprompts.methods import METHODS, PromptMethod
from softprompts.model.artifacts import Artifact, KVPrefix, SoftPrompt
from softprompts.model.frozen import FrozenBase
from softprompts.model.probe import ModelShapes


# PEFT type -> our method: the first method in ``METHODS`` that declares it as its counterpart (``peft_type`` in
# methods/*.py), e.g. PREFIX_TUNING -> prefix. Data, not control flow: code below branches on the artifact kind.
def _counterparts() -> dict[str, type[PromptMethod]]:
    found: dict[str, type[PromptMethod]] = {}
    for cls in METHODS.values():
        if cls.peft_type:
            found.setdefault(cls.peft_type, cls)
    return found


PEFT_TYPES = _counterparts()


class PeftImportError(SoftpromptsError):
    """A PEFT adapter directory that cannot be imported (unsupported type, malformed, wrong base model)."""


@dataclass
class PeftAdapter:
    """What a PEFT prompt-learning directory holds: its config and ``prompt_embeddings [P, width]``."""

    config: dict
    embeddings: torch.Tensor
    header: dict  # the safetensors ``__metadata__`` (ours when the file was written by ``export_peft``)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type"))


def read_peft(directory: str | Path) -> PeftAdapter:
    """Read and validate a PEFT prompt-learning adapter directory (no base model needed)."""
    directory = Path(directory)
    config_path = directory / PEFT_CONFIG_FILE
    if not directory.is_dir():
        raise PeftImportError(f"{directory} is not a directory; pass the folder PEFT's save_pretrained wrote")
    if not config_path.is_file():
        raise PeftImportError(f"{directory} is not a PEFT adapter: {PEFT_CONFIG_FILE} is missing")
    config = read_json(config_path, PeftImportError)
    if not isinstance(config, dict):
        raise PeftImportError(f"{config_path} must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise PeftImportError(
            f"{directory}: peft_type {peft_type!r} is not supported; softprompts imports prompt-learning adapters "
            f"({', '.join(PEFT_TYPES)}), not weight adapters such as LoRA"
        )
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM", "SEQ_2_SEQ_LM") or config.get("num_transformer_submodules", 1) not in (
            None, 1):
        raise PeftImportError(
            f"{directory}: task_type {task_type!r} (num_transformer_submodules="
            f"{config.get('num_transformer_submodules')}) is not supported; CAUSAL_LM adapters and SEQ_2_SEQ_LM "
            "soft prompts in front of the encoder only (num_transformer_submodules=1) are"
        )
    if task_type == "SEQ_2_SEQ_LM" and peft_type == "PREFIX_TUNING":
        raise PeftImportError(
            f"{directory}: PEFT's SEQ_2_SEQ_LM prefix tuning puts keys/values in the decoder only, which is not "
            "prefix tuning as softprompts runs it on encoder-decoder models (encoder, decoder and cross-attention); "
            "train it with softprompts instead")
    weights = directory / PEFT_WEIGHTS_FILE
    if not weights.is_file():
        hint = " (adapter_model.bin is a pickle and is never loaded: re-save with safe_serialization=True)" if (
            directory / "adapter_model.bin"
        ).is_file() else ""
        raise PeftImportError(f"{directory} has no {PEFT_WEIGHTS_FILE}{hint}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = list(f.keys())
            header = f.metadata() or {}
            if "prompt_embeddings" not in names:
                raise PeftImportError(
                    f"{weights} holds {sorted(names)[:5]} but not 'prompt_embeddings', the tensor PEFT saves for "
                    f"{peft_type}; is the file from another adapter type?"
                )
            embeddings = f.get_tensor("prompt_embeddings")
    except (SafetensorError, OSError) as exc:
        raise PeftImportError(f"{weights} is truncated or corrupted ({exc})") from None
    if embeddings.dim() != 2:
        raise PeftImportError(f"{weights}: prompt_embeddings must be 2-D [P, width], got {tuple(embeddings.shape)}")
    declared = config.get("num_virtual_tokens")
    if declared is not None and int(declared) != embeddings.shape[0]:
        raise PeftImportError(
            f"{directory}: num_virtual_tokens is {declared} but prompt_embeddings has {embeddings.shape[0]} rows"
        )
    return PeftAdapter(config=config, embeddings=embeddings, header=header)


def peft_rows_to_prefix(rows: torch.Tensor, layers: int, heads: int, dim: int) -> KVPrefix:
    """PEFT's ``prompt_embeddings [P, L * 2 * H * D]`` -> per-layer ``keys[l], values[l]: [H, P, D]``."""
    kv = rows.reshape(rows.shape[0], 2 * layers, heads, dim).permute(1, 2, 0, 3)  # [2L, H, P, D]
    keys = [kv[2 * i].contiguous() for i in range(layers)]
    return KVPrefix(keys, [kv[2 * i + 1].contiguous() for i in range(layers)])


def _artifact(peft: PeftAdapter, kind: str, shapes: ModelShapes, where: str) -> Artifact:
    """Validate ``peft.embeddings`` against the base model's shapes and convert it to our artifact."""
    rows = peft.embeddings
    seq2seq_adapter = peft.config.get("task_type") == "SEQ_2_SEQ_LM"
    if seq2seq_adapter != bool(shapes.encoder_layers):
        raise PeftImportError(
            f"{where}: a {peft.config.get('task_type') or 'CAUSAL_LM'} adapter for "
            f"{'an encoder-decoder' if seq2seq_adapter else 'a decoder-only'} model, but the base model is "
            f"{'decoder-only' if seq2seq_adapter else 'an encoder-decoder'}; pass its base with --model")
    if kind == SoftPrompt.kind:
        if rows.shape[1] != shapes.hidden_size:
            raise PeftImportError(
                f"{where}: prompt_embeddings width {rows.shape[1]} != the base model's hidden size "
                f"{shapes.hidden_size}; this adapter was made for another model (pass it with --model)"
            )
        return SoftPrompt(rows.contiguous())
    layers = int(peft.config.get("num_layers") or 0)
    heads = int(peft.config.get("num_attention_heads") or 0)
    token_dim = int(peft.config.get("token_dim") or 0)
    if layers != shapes.num_layers:
        raise PeftImportError(f"{where}: num_layers is {layers} but the base model has {shapes.num_layers} layers")
    if not heads or not token_dim or token_dim % heads or rows.shape[1] != layers * 2 * token_dim:
        raise PeftImportError(
            f"{where}: prompt_embeddings width {rows.shape[1]} does not match num_layers x 2 x token_dim = "
            f"{layers} x 2 x {token_dim} (num_attention_heads {heads}); the config and tensor disagree"
        )
    dim = token_dim // heads
    prefix = peft_rows_to_prefix(rows, layers, heads, dim)
    keys, values = [], []
    for layer, (k, v) in enumerate(zip(prefix.keys, prefix.values, strict=True)):
        want_heads, want_dim = shapes.kv_heads[layer], shapes.head_dims[layer]
        if want_heads > heads or want_dim > dim:
            raise PeftImportError(
                f"{where}: layer {layer} of the base model has {want_heads} key/value heads of size {want_dim} but the "
                f"prefix provides {heads} x {dim}; it was made for another model (or by a PEFT without GQA support, "
                f"which used the query head count)"
            )
        if (want_heads, want_dim) != (heads, dim):  # PEFT's heterogeneous-layer rule: slice the provisioned prefix
            k, v = k[:want_heads, :, :want_dim], v[:want_heads, :, :want_dim]
        keys.append(k.contiguous())
        values.append(v.contiguous())
    return KVPrefix(keys, values)


def import_peft(directory: str | Path, base: FrozenBase) -> Adapter:
    """Read a PEFT prompt-learning adapter for ``base`` into an ``Adapter`` (outputs equal PEFT's, see tests).

    An adapter written by ``export_peft`` gets its original method and task metadata back; any other gets the
    method named by its ``peft_type`` and no task metadata.
    """
    peft = read_peft(directory)
    cls = PEFT_TYPES[peft.peft_type]
    kind, method = cls.artifact_kind, cls.name
    artifact = _artifact(peft, kind, base.shapes, str(directory))
    ours = _our_record(peft, str(directory))
    if ours is not None and ours.artifact == kind:
        method, method_config, task = ours.method, ours.method_config, ours.task
    else:
        method_config = cls.config_class.from_options(num_virtual_tokens=artifact.length, init="random").to_json()
        task = None
    return Adapter(
        artifact=artifact,
        method=method,
        method_config=method_config,
        base_name=base.name,
        base_shapes=base.shapes,
        base_weights_fingerprint=base.weights_fingerprint(),
        task=task,
    )


def _our_record(peft: PeftAdapter, where: str) -> AdapterRecord | None:
    """The ``adapter.json`` that ``export_peft`` put in the weights' header (``codec.decode_adapter``); ``None``
    for a PEFT adapter from elsewhere, or a header that is not a valid document."""
    text = peft.header.get(METADATA_KEY)
    if not text:
        return None
    try:
        return decode_adapter(json.loads(text), f"{where} ({METADATA_KEY} header)")
    except (json.JSONDecodeError, AdapterError):
        return None
