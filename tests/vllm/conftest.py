"""Where vLLM's CPU build cannot run, every test here skips with one line saying why (never a silent pass)."""

from __future__ import annotations

import platform

import pytest


def vllm_cannot_run() -> str | None:
    """Why vLLM's CPU build cannot run on this machine, or ``None``. On x86 its kernels need AVX2 or AVX-512 (it
    ships ``_C_AVX2`` and ``_C_AVX512``); a CUDA build runs wherever a GPU is visible."""
    try:
        import torch
    except ImportError:
        return None  # the tests' own importorskip says what is missing
    if torch.cuda.is_available() or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"vLLM's CPU build needs AVX2 or AVX-512 on x86; this CPU offers {capability}: vLLM tests skipped"
    return None


def pytest_collection_modifyitems(config, items):
    reason = vllm_cannot_run()
    if reason:
        for item in items:
            if "tests/vllm/" in str(item.path).replace("\\", "/"):
                item.add_marker(pytest.mark.skip(reason=reason))
