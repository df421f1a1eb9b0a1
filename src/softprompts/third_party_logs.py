"""Loggers of other libraries that warn at import time about nothing a user can act on, quieted to errors (unless the
application set their level itself): torchao, installed for ``--quantize int8`` and imported by transformers
whenever it is present, about its CUDA kernels on a CPU-only machine, and through it torch's pytree about a
deprecation; bitsandbytes (for ``--quantize nf4``), imported by transformers when present, on a CPU with AVX512-BF16
about a kernel to fetch from the Hugging Face hub (``pip install kernels``; its own kernel is used instead, and
``model/quantize.py`` keeps 4-bit layers on their differentiable path anyway).
Imported first by the package, before anything imports transformers."""

from __future__ import annotations

import logging

QUIETED = ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops")

for name in QUIETED:
    if logging.getLogger(name).level == logging.NOTSET:
        logging.getLogger(name).setLevel(logging.ERROR)

__all__ = ["QUIETED"]
