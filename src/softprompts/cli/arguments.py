"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse
import math


def finite(text: str) -> float:
    """A float flag: ``nan``, ``inf`` and non-numbers are argparse errors (one line naming the flag), never a value
    that silently passes every later ``<`` check."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_quantize_flag(p) -> None:
    """``--quantize``: load the frozen base's linear layers quantized (``model/quantize.py``)."""
    from softprompts.model.quantize import QUANTIZATIONS

    choices = ", ".join(f"{name} ({backend}: {what})" for name, (backend, what) in QUANTIZATIONS.items())
    p.add_argument("--quantize", default=None, choices=list(QUANTIZATIONS), metavar="KIND",
                   help=f"load the frozen base quantized: {choices}; needs pip install 'softprompts[quantize]' "
                        "(default: full precision)")


DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")
"""What ``--dtype`` takes (``model/load.DTYPES`` holds them, and aliases, for Python callers)."""


def add_dtype_flag(p, default: str | None = None) -> None:
    """``--dtype``: the frozen base's weights and compute dtype (``model/load.resolve_dtype``); a name outside
    ``DTYPE_CHOICES`` is an argparse error naming them."""
    p.add_argument("--dtype", default=default, choices=DTYPE_CHOICES, metavar="DTYPE",
                   help="the base model's dtype: float32 (default), bfloat16, float16, or auto (bfloat16 on a CUDA GPU "
                        "with bf16 and on a CPU with AVX512-BF16 / AMX, else float32: model/load.auto_dtype; quality "
                        "against float32 in docs/BENCHMARKS.md)")


def say_dtype(dtype: str | None, device=None) -> None:
    """With ``--dtype auto``, say on stderr what it picked on ``device`` (default: ``auto``, where the commands put
    the base) and why (``model/load.auto_dtype``)."""
    if dtype == "auto":
        import sys

        from softprompts.model.load import auto_dtype, resolve_device

        print(f"--dtype {auto_dtype(resolve_device(device or 'auto')).reason}", file=sys.stderr, flush=True)


def add_report_flag(p) -> None:
    """``--report-to``: the trackers that watch training (``training/trackers.py``), checked before training."""
    from softprompts.training.trackers import TRACKERS

    p.add_argument("--report-to", default="none", metavar="TRACKERS",
                   help=f"watch training in {', '.join(TRACKERS)} (comma-separated, or none): loss, lr, gradient "
                        "norm, tokens/s, dev metrics, the configuration and the final metrics; offline stores under "
                        "the output directory (OUT/tensorboard, OUT/mlflow.db); each needs its extra, e.g. "
                        "pip install 'softprompts[tensorboard]'")


__all__ = ["DTYPE_CHOICES", "add_dtype_flag", "add_quantize_flag", "add_report_flag", "finite", "say_dtype"]
