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


__all__ = ["finite"]
