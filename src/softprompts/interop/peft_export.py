"""Export an adapter as a Hugging Face PEFT prompt-learning adapter (``PeftModel.from_pretrained`` loads it).

What PEFT stores for prompt learning (``peft/utils/save_and_load.py``, ``BasePromptEncoder._get_adapter_state_dict``)
is ONE tensor, ``prompt_embeddings``, already collapsed (encoders run once), which its inference mode reads directly
(``get_prompt``: ``prompt_encoder.embedding.weight``). We write exactly that:

* a ``SoftPrompt`` ``[P, hidden]`` (prompt tuning, P-tuning) -> ``PROMPT_TUNING``, ``prompt_embeddings [P, hidden]``.
  Not ``P_TUNING``: a ``P_TUNING`` adapter re-opened with ``is_trainable=True`` would push the collapsed table through a
  freshly initialized MLP; ``PROMPT_TUNING`` means the same thing in every PEFT mode.
* a ``KVPrefix`` (prefix tuning, deep prompts) -> ``PREFIX_TUNING`` with ``prefix_projection=False``,
  ``prompt_embeddings [P, L * 2 * H * D]``. PEFT reads it as ``view(P, 2L, H, D)``, row ``2l`` the keys and
  ``2l + 1`` the values of layer ``l`` (``peft_model.py`` ``get_prompt``: ``permute([2, 0, 3, 1, 4]).split(2)``), with
  ``num_attention_heads = H`` the KEY/VALUE heads and ``token_dim = H * D`` (PEFT's GQA handling, issue #1901).
  PEFT has one ``H`` and one ``D`` for all layers: a prefix for a model with per-layer sizes cannot be exported.

Conventions (measured on transformers 5.24 / PEFT 0.21.2, see the tests): for unpadded and right-padded batches PEFT
gives the same logits as ours for both artifacts, real tokens at positions ``P..P+T-1``. With LEFT padding PEFT
numbers positions by slot (pads take positions) unless ``position_ids`` are passed; for prefixes it adds ``P`` to the
``position_ids`` you pass (so ``attention_mask.cumsum(-1) - 1`` reproduces ours exactly), for soft prompts it drops
them with a warning, so left-padded rows differ from ours there. Export cannot change that: the files are
position-free data. PEFT's ``generate`` with a prefix on transformers >= 5.24 ignores the prefix; ``forward`` works.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from softprompts.adapter import Adapter
from softprompts.errors import SoftpromptsError
from softprompts.files import atomic_directory
from softprompts.model.artifacts import KVPrefix, OffsetPrompt, SoftPrompt

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_KEY = "softprompts_adapter"  # our adapter.json, kept in the safetensors header so import can round-trip


class PeftExportError(SoftpromptsError):
    """An adapter that PEFT's file format cannot represent."""


def prefix_to_peft_rows(prefix: KVPrefix) -> torch.Tensor:
    """Per-layer ``keys[l], values[l]: [H, P, D]`` -> PEFT's ``prompt_embeddings [P, L * 2 * H * D]``."""
    heads = {int(k.shape[0]) for k in prefix.keys}
    dims = {int(k.shape[-1]) for k in prefix.keys}
    if len(heads) != 1 or len(dims) != 1:
        raise PeftExportError(
            f"PEFT prefix tuning needs the same key/value heads and head dim in every layer; this prefix has heads "
            f"{sorted(heads)} and head dims {sorted(dims)} across layers, which PEFT cannot represent"
        )
    per_layer = []
    for k, v in zip(prefix.keys, prefix.values, strict=True):
        per_layer += [k.permute(1, 0, 2), v.permute(1, 0, 2)]  # [H, P, D] -> [P, H, D]
    rows = torch.stack(per_layer, dim=1)  # [P, 2L, H, D]: 2l = keys, 2l + 1 = values of layer l
    return rows.reshape(rows.shape[0], -1).contiguous()  # [P, L * 2 * H * D]


def to_peft(adapter: Adapter) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's ``adapter_config.json`` content and tensors (``{"prompt_embeddings": ...}``) for ``adapter``."""
    artifact = adapter.artifact
    if artifact.kind == OffsetPrompt.kind:
        raise PeftExportError(
            f"PEFT has no DePT (its method list has no decomposed prompt tuning; only forks of PEFT do): this "
            f"adapter's soft prompt alone would drop its embedding offsets on the prompt's first "
            f"{artifact.offsets.positions} tokens and answer differently. Serve it with softprompts")
    shapes = adapter.base_shapes
    seq2seq = bool(shapes.encoder_layers)  # PEFT's SEQ_2_SEQ_LM: the soft prompt in front of the encoder input only
    if seq2seq and isinstance(artifact, KVPrefix):
        raise PeftExportError(
            "PEFT's SEQ_2_SEQ_LM prefix tuning puts keys/values in the decoder only; this adapter also has the "
            "encoder's self-attention and the cross-attention prefixes (Li & Liang), which PEFT's format cannot hold. "
            "Serve it with softprompts, or export a prompt-tuning / P-tuning adapter")
    common = {
        "task_type": "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
        "inference_mode": True,
        "num_virtual_tokens": artifact.length,
        "num_transformer_submodules": 1,
        "num_layers": shapes.num_layers,
        "base_model_name_or_path": adapter.base_name,
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    if isinstance(artifact, SoftPrompt):
        embeds = artifact.embeds  # [P, hidden]
        config = {
            **common,
            "peft_type": "PROMPT_TUNING",
            "token_dim": int(embeds.shape[1]),
            "num_attention_heads": None,  # unused by prompt tuning; PEFT fills it from the model config
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
        }
        return config, {"prompt_embeddings": embeds.detach().cpu().clone().contiguous()}
    if isinstance(artifact, KVPrefix):
        rows = prefix_to_peft_rows(artifact)
        heads, dim = int(artifact.keys[0].shape[0]), int(artifact.keys[0].shape[-1])
        config = {
            **common,
            "peft_type": "PREFIX_TUNING",
            "token_dim": heads * dim,  # PEFT's GQA convention: KV heads x head dim
            "num_attention_heads": heads,
            "encoder_hidden_size": heads * dim,
            "prefix_projection": False,
        }
        return config, {"prompt_embeddings": rows.detach().cpu()}
    raise PeftExportError(f"cannot export an artifact of kind {getattr(artifact, 'kind', type(artifact).__name__)!r}")


def export_peft(adapter: Adapter, out: str | Path, overwrite: bool = False) -> Path:
    """Atomically write ``out/adapter_config.json`` + ``out/adapter_model.safetensors`` (PEFT's format).

    No base model is needed: the adapter records every shape. Our own ``adapter.json`` travels in the safetensors
    header (key ``softprompts_adapter``) so that ``import_peft`` restores method and task metadata exactly.
    """
    config, tensors = to_peft(adapter)
    header = {"format": "pt", METADATA_KEY: json.dumps(adapter.metadata())}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / PEFT_WEIGHTS_FILE), metadata=header)
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return atomic_directory(out, write, overwrite=overwrite)
