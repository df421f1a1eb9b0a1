"""A quantized frozen base: its linear layers' weights stored in 4 or 8 bits, dequantized on the fly.

Only the adapter trains, so the frozen base is pure weight memory, the place where quantization pays most (QLoRA's
point). The embedding matrix and the output head stay in the model's dtype (both backends leave them: the head is
skipped, the embedding is not a linear layer), so a soft prompt of real token embeddings is still exactly those
tokens and the fused head loss reads the same weights.

``QUANTIZATIONS`` (one backend each, the maintained library made for it):

- ``nf4``: bitsandbytes 4-bit NormalFloat with double quantization, QLoRA's recipe: about 0.53 bytes per linear
  weight; runs on CUDA and on the CPU (bitsandbytes' multi-backend build). Compute in the model's dtype.
- ``int8``: torchao int8 weight-only (per-channel scales): 1 byte per linear weight, on CPU and CUDA. bitsandbytes'
  own 8-bit path (LLM.int8) casts activations to float16 on the CPU and is several times slower there, so it is not
  used.

``x = W_q.dequantize() @ h``: the forward is the full-precision one up to the weights' rounding, so gradients flow
to the inputs (soft prompts, KV prefixes) exactly as through the full-precision base.

That holds only on bitsandbytes' training path, which ``keep_differentiable`` pins (``freeze`` calls it). On a CPU
with AVX512-BF16, bitsandbytes (>= 0.48) treats a ``Linear4bit`` in eval mode that sees an input without gradient
as inference-only: it repacks the weight, once and for good, into a layout read by a fused kernel
(``bitsandbytes::gemv_4bit``) that computes in bfloat16 and has no autograd formula. A frozen base is always in eval
mode and its first forwards (the shape probe, an initialization, a bare evaluation) run without gradient, so every
later forward, training's included, went through that kernel: ``dL/dh`` through each quantized linear layer was
silently zero (a soft prompt or KV prefix reaches the loss only through attention's projections, so its whole
gradient was zero and an nf4 base did not learn), and the forward was bfloat16 (SmolLM2-135M: logits off by up to
0.9 against the same nf4 weights dequantized to fp32; 0 on the training path).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING

from softprompts.errors import SoftpromptsError

if TYPE_CHECKING:
    import torch

QUANTIZATIONS = {
    "nf4": ("bitsandbytes", "4-bit NormalFloat (QLoRA), double-quantized"),
    "int8": ("torchao", "int8 weight-only, per-channel scales"),
}


class QuantizationError(SoftpromptsError):
    """A quantization that cannot be used here (unknown, its backend missing, a model it cannot quantize)."""


def check_quantization(kind: str | None) -> None:
    if kind is not None and kind not in QUANTIZATIONS:
        raise QuantizationError(f"unknown quantization {kind!r}; choose one of {', '.join(QUANTIZATIONS)}")


def backend_version(kind: str) -> str:
    """``"bitsandbytes 0.50.2"``; ``QuantizationError`` saying how to install the backend when it is missing."""
    package = QUANTIZATIONS[kind][0]
    try:
        importlib.import_module(package)
        return f"{package} {importlib.metadata.version(package)}"
    except ImportError as exc:
        raise QuantizationError(f"--quantize {kind} needs {package} ({exc}); install it with "
                                f"pip install 'softprompts[quantize]'") from None


def quantization_config(kind: str, dtype: torch.dtype):
    """The transformers ``quantization_config`` that loads a model quantized as ``kind`` (compute in ``dtype``)."""
    check_quantization(kind)
    backend_version(kind)
    if kind == "nf4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def keep_differentiable(model: torch.nn.Module) -> torch.nn.Module:
    """Pin bitsandbytes' 4-bit layers of ``model`` to their differentiable path, ``x W^T`` with ``W`` dequantized in
    the compute dtype (``MatMul4Bit``: its backward is ``dL/dx = dL/dy W``), in eval mode and without gradient too.

    Turns off the CPU inference repacking (see the module docstring) and undoes it where it already ran (a model
    used for inference before it became a frozen base): bitsandbytes' inverse restores the 4-bit codes exactly and
    quantizes the block scales again from their bfloat16 copy. A model without such layers is left as it is.
    """
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit (and its subclasses)
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
    return model


def quantization_of(model) -> str | None:
    """How a loaded model's weights are quantized: ``nf4``, ``int8`` (our names), the backend's own description for
    any other quantization, ``None`` for full precision."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    as_dict = config if isinstance(config, dict) else config.to_dict()
    method = as_dict.get("quant_method", "")
    method = str(getattr(method, "value", method)).lower()  # an enum member in memory, its value in a config file
    if method == "bitsandbytes" and as_dict.get("load_in_4bit"):
        return str(as_dict.get("bnb_4bit_quant_type", "4bit"))
    if method == "bitsandbytes":
        return "bnb-int8"
    if method == "torchao":
        quant_type = as_dict.get("quant_type")
        name = quant_type if isinstance(quant_type, str) else str(quant_type)
        return "int8" if "Int8WeightOnly" in name or name == "int8_weight_only" else f"torchao-{name}"
    return method or "quantized"


__all__ = ["QUANTIZATIONS", "QuantizationError", "backend_version", "check_quantization", "keep_differentiable",
           "quantization_config", "quantization_of"]
