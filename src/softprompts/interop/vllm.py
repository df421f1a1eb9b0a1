"""Soft prompts on vLLM, through ``prompt_embeds`` (vLLM 0.10 removed prompt adapters).

vLLM's ``/v1/completions``, on a server started with ``--enable-prompt-embeds``, takes ``"prompt_embeds"``: the
base64 text of ``torch.save`` of one ``[seq_len, hidden]`` tensor (loaded with ``weights_only=True``), which
replaces the embedding layer's output for the whole prompt. No chat template is applied and nothing is added, so the
client embeds the fully rendered prompt itself:

    embeds = [e(text before the <|virtual|> marker); soft prompt [P, hidden]; e(text after it)]   -> [T, hidden]

with ``e`` the model's input embedding (``get_input_embeddings()``, which already holds any embedding scale, e.g.
Gemma's) and the soft prompt first when the prompt has no marker: the sequence softprompts feeds the model, at the
same positions ``0..T-1`` (``model/placement.py``). ``tests/test_vllm.py`` decodes the payload, feeds it to the HF
model as ``inputs_embeds`` and checks the greedy tokens equal our adapter's.

A DePT adapter (``OffsetPrompt``) adds its offsets ``A·B [S, hidden]`` to the embeddings of the text after the soft
prompt, by each token's index ``i < S`` (``VirtualContext.offset_embeds``, the rule our injection uses):

    embeds = [e(lead); soft prompt; e(x_i) + (A·B)_i for i < S, then e(x_i)]

* ``export_vllm(adapter, out)``: ``soft_prompt.safetensors`` (``[P, hidden]``; a DePT adapter's also holds
  ``offsets.a [S, r]`` and ``offsets.b [r, hidden]``) and ``vllm.json`` (the base model, the task's prompt template
  or chat placement, how to build a request) - what a client needs.
* ``load_soft_prompt(out)`` -> ``[P, hidden]``; ``load_offsets(out)`` -> ``EmbeddingOffsets`` or ``None``;
  ``prompt_embeds(model, tokenizer, soft_prompt, prompt, offsets=None)`` -> ``[T, hidden]``;
  ``encode_prompt_embeds(tensor)`` -> the base64 string; ``completion_request(model_name, embeds, **fields)`` -> the
  JSON body.

KV-prefix adapters (prefix tuning, deep prompts) have no vLLM input of their own: ``VllmExportError`` says so, and
that ``softprompts serve --engine vllm`` serves them on vLLM (``vllm_front.py``, through the KV connector
``vllm_kv.py``), as it serves soft prompts by name without any client-side payload.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from softprompts.adapter import Adapter
from softprompts.codec import task_json
from softprompts.data.templates import VIRTUAL
from softprompts.errors import SoftpromptsError
from softprompts.files import atomic_directory
from softprompts.model.artifacts import EmbeddingOffsets, OffsetPrompt, SoftPrompt, VirtualContext

SOFT_PROMPT_FILE = "soft_prompt.safetensors"
CONFIG_FILE = "vllm.json"


class VllmExportError(SoftpromptsError):
    """An adapter vLLM cannot serve."""


def _soft_prompt(adapter: Adapter) -> torch.Tensor:
    if not isinstance(adapter.artifact, SoftPrompt | OffsetPrompt):
        raise VllmExportError(
            f"a {adapter.method} adapter is a KV prefix (per-layer keys and values); vLLM takes only input embeddings "
            "(prompt_embeds), it has no KV-prefix input. Serve it on vLLM with `softprompts serve --engine vllm` "
            "(the KV goes in through softprompts' KV connector), or with `softprompts serve`, or train prompt tuning / "
            "P-tuning for vLLM")
    return adapter.artifact.embeds.detach().cpu().contiguous()


def _offsets(adapter: Adapter) -> dict[str, torch.Tensor]:
    """A DePT adapter's offsets factors (``offsets.a``, ``offsets.b``) as saved; ``{}`` for a soft prompt."""
    artifact = adapter.artifact
    if not isinstance(artifact, OffsetPrompt):
        return {}
    return {name: t.detach().cpu().contiguous() for name, t in artifact.offsets.tensors().items()}


def export_vllm(adapter: Adapter, out: str | Path, overwrite: bool = False) -> Path:
    """Write the soft prompt and what a vLLM client needs to use it (atomically: all files or none)."""
    if adapter.base_shapes.encoder_layers:
        raise VllmExportError(
            f"{adapter.base_name} is an encoder-decoder model; vLLM's prompt_embeds input is for decoder-only "
            "models. Serve this adapter with softprompts generate / eval or the Python API")
    embeds, offsets = _soft_prompt(adapter), _offsets(adapter)
    config = {
        "format": "softprompts-vllm-prompt-embeds",
        "base_model": adapter.base_name,
        "method": adapter.method,
        "num_virtual_tokens": int(embeds.shape[0]),
        "hidden_size": int(embeds.shape[1]),
        "dtype": str(embeds.dtype).removeprefix("torch."),
        "task": task_json(adapter.task),
        "placement": "at the <|virtual|> marker of the rendered prompt, else before it",
        "usage": "start vLLM with --enable-prompt-embeds; per request send {'model': ..., 'prompt_embeds': "
                 "softprompts.interop.vllm.encode_prompt_embeds(prompt_embeds(model, tokenizer, soft_prompt, "
                 "rendered_prompt" + (", offsets=load_offsets(dir)" if offsets else "") + ")), ...} to "
                 "/v1/completions (no chat template is applied: render it yourself)",
    }
    if offsets:
        config["offsets"] = {"positions": int(offsets["offsets.a"].shape[0]),
                             "rank": int(offsets["offsets.a"].shape[1]),
                             "rule": "(offsets.a @ offsets.b)[i] added to the embedding of the i-th token after the "
                                     "soft prompt, for i < positions (the prompt's tokens only, never generated ones)"}

    def write(tmp: Path) -> None:
        save_file({"soft_prompt": embeds, **offsets}, str(tmp / SOFT_PROMPT_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    return atomic_directory(out, write, overwrite=overwrite)


def load_soft_prompt(directory: str | Path) -> torch.Tensor:
    """The ``[P, hidden]`` soft prompt of an ``export_vllm`` directory."""
    return load_file(str(Path(directory) / SOFT_PROMPT_FILE))["soft_prompt"]


def load_offsets(directory: str | Path) -> EmbeddingOffsets | None:
    """A DePT export's offsets (``A [S, r]``, ``B [r, hidden]``); ``None`` for a soft prompt's."""
    tensors = load_file(str(Path(directory) / SOFT_PROMPT_FILE))
    return EmbeddingOffsets(tensors["offsets.a"], tensors["offsets.b"]) if "offsets.a" in tensors else None


def prompt_embeds(model, tokenizer, soft_prompt: torch.Tensor, prompt: str,
                  offsets: EmbeddingOffsets | None = None) -> torch.Tensor:
    """``[T, hidden]``: the embeddings of ``prompt`` with ``soft_prompt [P, hidden]`` at its ``<|virtual|>`` marker
    (first when there is none), and a DePT adapter's ``offsets`` added to the embeddings of the text after it (module
    docstring). ``model``: an HF model (or anything with ``get_input_embeddings``)."""
    lead, marker, rest = prompt.partition(VIRTUAL)
    if not marker:
        lead, rest = "", prompt
    if VIRTUAL in rest:
        raise SoftpromptsError(f"the prompt has more than one {VIRTUAL} marker")
    embedding = model.get_input_embeddings()
    weight = embedding.weight
    parts = []
    with torch.no_grad():
        for text in (lead, None, rest):
            if text is None:
                parts.append(soft_prompt.to(device=weight.device, dtype=weight.dtype))
            elif text:
                ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], device=weight.device)
                parts.append(embedding(ids))
        if offsets is not None and rest:
            ctx = VirtualContext.from_rows([OffsetPrompt(SoftPrompt(soft_prompt), offsets.to(weight.device))])
            mask = torch.ones(1, parts[-1].shape[0], dtype=torch.long, device=weight.device)
            parts[-1] = ctx.offset_embeds(parts[-1][None], mask)[0]
    return torch.cat(parts, dim=0).cpu()


def encode_prompt_embeds(embeds: torch.Tensor) -> str:
    """What vLLM's ``prompt_embeds`` field takes: base64 of ``torch.save`` of the ``[T, hidden]`` tensor."""
    if embeds.dim() != 2:
        raise SoftpromptsError(f"prompt_embeds must be [seq_len, hidden], got shape {tuple(embeds.shape)}")
    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_prompt_embeds(payload: str) -> torch.Tensor:
    """The tensor of a ``prompt_embeds`` string, loaded the way vLLM loads it (``weights_only=True``)."""
    return torch.load(io.BytesIO(base64.b64decode(payload)), weights_only=True)


def completion_request(model_name: str, embeds: torch.Tensor, **fields) -> dict:
    """A ``/v1/completions`` body for vLLM with ``embeds`` as the prompt (``max_tokens``, ``temperature``, ...)."""
    return {"model": model_name, "prompt_embeds": encode_prompt_embeds(embeds), **fields}


__all__ = ["VllmExportError", "completion_request", "decode_prompt_embeds", "encode_prompt_embeds", "export_vllm",
           "load_offsets", "load_soft_prompt", "prompt_embeds"]
