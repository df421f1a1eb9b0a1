"""Peak tensor memory of a callable, for the benchmarks (and the tests that check the fused head's saving).

Used by ``train_speed.py`` and ``head_loss.py``; the library itself measures compare runs' memory with
``softprompts.compare.latency`` (the process's resident set, what a user sees).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak of allocated tensor bytes while ``fn()`` runs, above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (minus the bytes allocated at the
    start). CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of the CPU
    allocator with its size; their running sum in time order is the live-bytes curve and its maximum is the peak
    (tensor bytes only, no allocator caching or Python objects). Run it outside timed repetitions (the profiler
    slows the step).
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    return cpu_peak_from_profile(prof)


def cpu_peak_from_profile(prof) -> int:
    """Maximum of the running sum of CPU allocator events (bytes > 0 allocate, < 0 free) in a profiler trace."""
    events = []
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU:
            events.append((event.start_ns(), event.nbytes()))
    events.sort(key=lambda e: e[0])
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return int(peak)



__all__ = ["cpu_peak_from_profile", "peak_bytes"]
