"""Load a frozen base model from an embedded name, a Hugging Face model id or a local directory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from softprompts.errors import SoftpromptsError
from softprompts.model.base import BaseModel
from softprompts.model.embedded import EMBEDDED_NAME, embedded_dir

DEFAULT_MODEL = EMBEDDED_NAME


class ModelLoadError(SoftpromptsError):
    """A model name that cannot be resolved or loaded."""


def resolve(name: str) -> str:
    """Embedded names map to their cached directory; anything else is passed to ``from_pretrained`` as is."""
    if name == EMBEDDED_NAME:
        return str(embedded_dir())
    return name


def load_base(
    name: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
    device_map: str | dict | None = None,
) -> BaseModel:
    """A frozen ``BaseModel``: ``name`` is ``smollm2-135m`` (embedded), an HF id (cached locally) or a directory.

    ``device``: ``None`` (default) leaves it where ``from_pretrained`` puts it (the CPU), ``"auto"`` puts it on the
    first CUDA GPU when one is visible, else on the CPU (what the command line does), or any torch device.

    ``device_map`` (e.g. ``"auto"``, needs accelerate) spreads the frozen weights over the visible devices for a model
    that does not fit one; adapters then live on the device of the input embeddings.
    """
    try:
        path = resolve(name)
    except FileNotFoundError as exc:
        raise ModelLoadError(str(exc)) from None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    local_only = not Path(path).exists()  # hub ids: use what is cached, never hang on a network here
    try:
        extra = {"device_map": device_map} if device_map is not None else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **extra)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        offline = " (no network: only models already in the Hugging Face cache or local directories load)"
        hint = offline if local_only else ""
        raise ModelLoadError(
            f"cannot load model {name!r}{hint}: {str(exc).splitlines()[0]}. "
            f"Use the embedded default {EMBEDDED_NAME!r}, a local directory, or a cached Hugging Face id."
        ) from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device and device_map is None:
        model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model=model, tokenizer=tokenizer, name=name)
