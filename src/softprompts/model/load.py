"""Load a frozen base model from an embedded name, a GGUF file, a Hugging Face model id or a local directory.

A GGUF file (``--model FILE.gguf``) loads as the embedded model does (``embedded.py``): dequantized to fp32 and
converted once into the cache (keyed by the file's sha256), with the tokenizer and chat template the file carries;
``resolve`` maps it to that copy, so everything after (PEFT's tokenizer path included) reads a directory.

Everything that can be checked before reading weights is: the device (it must exist: ``cuda:7`` on a machine with
one GPU is an error naming what is visible), the dtype, and for a hub id that it is in the local Hugging Face cache
or that the hub answers within a few seconds (``HF_HUB_OFFLINE=1`` or no network: an immediate error saying how to
pass a local directory, instead of half a minute of retries; ``hub_unreachable``, which hub datasets ask too).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from softprompts.errors import SoftpromptsError
from softprompts.model.decoder import BaseModel
from softprompts.model.embedded import EMBEDDED_NAME, embedded_dir, gguf_dir, is_gguf_name
from softprompts.model.encoder_decoder import EncoderDecoderBase
from softprompts.model.frozen import FrozenBase
from softprompts.model.quantize import quantization_config

DEFAULT_MODEL = EMBEDDED_NAME
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelLoadError(SoftpromptsError):
    """A model name that cannot be resolved or loaded."""


def resolve(name: str) -> str:
    """Embedded names and GGUF files map to their converted copy in the cache (``embedded.py``); anything else is
    passed to ``from_pretrained`` as is."""
    if name == EMBEDDED_NAME:
        return str(embedded_dir())
    if is_gguf_name(name):
        return str(gguf_dir(name))
    return name


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``None`` (leave the model where it loads), ``"auto"`` (the first CUDA GPU when one is visible, else the CPU) or
    a torch device that exists here; ``ModelLoadError`` naming what is visible otherwise."""
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelLoadError(f"device {device!r} asked for, but no CUDA GPU is visible here; use --device cpu")
        if chosen.index is not None and chosen.index >= count:
            raise ModelLoadError(f"device {device!r} asked for, but only {count} CUDA GPU(s) are visible "
                                 f"(cuda:0..cuda:{count - 1})")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return chosen


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype names ``--dtype`` takes, besides ``auto``."""

_FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 / AMX tiles; aarch64 FEAT_BF16


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype ``auto`` picked for a device, and why (one line a command can print)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        """``"bfloat16"``: the name vLLM's ``--dtype`` and ``from_pretrained`` take."""
        return dtype_name(self.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (``flags`` on x86, ``Features`` on aarch64); empty where
    ``/proc/cpuinfo`` cannot be read (macOS, Windows: ``auto`` then stays float32 on the CPU)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def auto_dtype(device: torch.device | None = None) -> DtypeChoice:
    """What ``--dtype auto`` loads a base in on ``device`` (``None``: the CPU), and why.

    bfloat16 where the hardware multiplies it natively: a CUDA GPU with bf16 (compute capability >= 8.0,
    ``torch.cuda.is_bf16_supported``), or a CPU with AVX512-BF16 / AMX-BF16 (x86) or BF16 (aarch64) in its flags,
    which oneDNN's bf16 matmuls use (vLLM's CPU build runs bf16 there too). float32 everywhere else: a CPU
    without them would emulate bf16 (slower than fp32 and less exact), MPS, older GPUs. The weights then take half
    the memory and a decode step reads half the bytes; the quality cost is measured in docs/BENCHMARKS.md (Y).
    """
    device = device if device is not None else torch.device("cpu")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, f"auto: bfloat16, {device} supports bf16")
        return DtypeChoice(torch.float32, f"auto: float32, {device} has no native bf16 (compute capability < 8.0)")
    if device.type == "cpu":
        fast = sorted(set(_FAST_BF16_FLAGS) & cpu_flags())
        capability = torch.backends.cpu.get_cpu_capability()
        if fast:
            return DtypeChoice(torch.bfloat16, f"auto: bfloat16, the CPU has {', '.join(fast)} ({capability})")
        return DtypeChoice(torch.float32, f"auto: float32, the CPU has no avx512_bf16 / amx_bf16 ({capability}): "
                                          "bf16 would be emulated")
    return DtypeChoice(torch.float32, f"auto: float32 on {device.type}")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | None = None) -> torch.dtype:
    """A floating torch dtype from a dtype, its name (``"bfloat16"``, ``"bf16"``) or ``"auto"`` (``auto_dtype`` on
    ``device``); float32 by default. ``ModelLoadError`` naming the choices for anything else."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return auto_dtype(device).dtype
    found = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return found


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """The reason the hub cannot be used from here, or ``None``."""
    if huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return None  # reached through a proxy: let huggingface_hub try
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s).close()
    except OSError:
        return f"the hub ({endpoint.hostname}) cannot be reached from here"
    return None


def check_reachable(name: str) -> None:
    """For a name that is not a local directory: fine if the Hugging Face cache holds it, else the hub must answer
    (a TCP connection within 3 s); ``ModelLoadError`` saying what to do otherwise."""
    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
            return
    except ValueError:  # not a repo id at all (huggingface_hub's validation error)
        raise ModelLoadError(f"cannot load model {name!r}: it is neither a local directory nor a Hugging Face model "
                             f"id; pass a directory written by save_pretrained, or the embedded {EMBEDDED_NAME!r}"
                             ) from None
    advice = (f"pass a local directory (a model saved with save_pretrained), a model already in the Hugging Face "
              f"cache, or the embedded default {EMBEDDED_NAME!r}")
    reason = hub_unreachable()
    if reason is not None:
        raise ModelLoadError(f"cannot load model {name!r}: it is not a local directory, not in the Hugging Face "
                             f"cache, and {reason}; {advice}")


def load_base(
    name: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
    device_map: str | dict | None = None, quantize: str | None = None,
) -> FrozenBase:
    """A frozen base model: ``name`` is ``smollm2-135m`` (embedded), a GGUF file (converted once, module docstring),
    an HF id (cached locally) or a directory.
    A decoder-only model loads as ``BaseModel``, an encoder-decoder one (T5, BART families) as ``EncoderDecoderBase``.

    ``device``: ``None`` (default) leaves it where ``from_pretrained`` puts it (the CPU), ``"auto"`` puts it on the
    first CUDA GPU when one is visible, else on the CPU (what the command line does), or any torch device.

    ``device_map`` (e.g. ``"auto"``, needs accelerate) spreads the frozen weights over the visible devices for a model
    that does not fit one; adapters then live on the device of the input embeddings.

    ``dtype``: float32 by default; ``"auto"`` is bfloat16 where the device multiplies it natively (``auto_dtype``).

    ``quantize`` (``nf4``, ``int8``: ``model/quantize.py``) loads the linear layers' weights quantized, straight onto
    ``device`` (the CPU by default); the embedding and output head stay in ``dtype``, which is also the compute dtype.
    """
    target = resolve_device(device)
    dtype = resolve_dtype(dtype, target)
    quantized = quantization_config(quantize, dtype) if quantize is not None else None  # a missing backend: here
    try:
        path = resolve(name)
    except FileNotFoundError as exc:
        raise ModelLoadError(str(exc)) from None
    if not Path(path).exists():
        check_reachable(path)
    try:
        extra = {"device_map": device_map} if device_map is not None else {}
        if quantized is not None:  # quantized weights are placed as they load, never moved after
            extra = {"device_map": device_map or str(target or "cpu"), "quantization_config": quantized}
        seq2seq = family_of(AutoConfig.from_pretrained(path)) is EncoderDecoderBase
        auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM  # T5, BART families: the encoder-decoder LM
        model = auto.from_pretrained(path, dtype=dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {name!r}: {str(exc).splitlines()[0]}. "
            f"Use the embedded default {EMBEDDED_NAME!r}, a GGUF file, a local directory, or a cached Hugging Face id."
        ) from None
    if target is not None and device_map is None and quantize is None:
        model.to(target)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return frozen_base(model, tokenizer, name)


def family_of(config) -> type[FrozenBase]:
    """The family class for an HF config: ``EncoderDecoderBase`` for ``is_encoder_decoder`` (T5, BART families),
    else ``BaseModel`` (decoder-only). The one place a flag picks a family; everything after asks the type."""
    return EncoderDecoderBase if getattr(config, "is_encoder_decoder", False) else BaseModel


def frozen_base(model: PreTrainedModel, tokenizer=None, name: str | None = None) -> FrozenBase:
    """A loaded HF model as a frozen base of its family (``name``: default the model's ``name_or_path``)."""
    name = name or getattr(model, "name_or_path", "") or type(model).__name__
    return family_of(model.config)(model=model, tokenizer=tokenizer, name=name)
