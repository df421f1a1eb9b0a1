"""Loggers of other libraries that warn at import time about nothing a user can act on, quieted to errors (unless the
application set their level itself): torchao, installed for ``--quantize int8`` and imported by transformers
whenever it is present, about its CUDA kernels on a CPU-only machine, and through it torch's pytree about a
deprecation. Imported first by the package, before anything imports transformers."""

from __future__ import annotations

import logging

QUIETED = ("torchao", "torch.utils._pytree")

for name in QUIETED:
    if logging.getLogger(name).level == logging.NOTSET:
        logging.getLogger(name).setLevel(logging.ERROR)

__all__ = ["QUIETED"]
