"""Inference cost of an adapter: time to first token, time per further token, peak memory of a run.

Latency is measured on our own decode loop (the path users serve with): the prefill (``forward`` with the adapter
injected and ``use_cache``) is the time to first token; every ``decode_step`` after it is one further token. Each
number is the median over ``repeats`` after one warm-up, for one prompt (batch 1), with and without the adapter, so
the difference is the adapter's own cost (a soft prompt lengthens the prefill by P positions; a KV prefix adds P
cached positions to attend to). PEFT models are timed through Hugging Face ``generate`` the same way
(``max_new_tokens=1`` for the first token, then ``N`` tokens), next to the bare model timed the same way.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's resident-set high-water mark
(``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs`` where the kernel allows it, else
``resource.getrusage``'s ``ru_maxrss``, which cannot be reset and then covers the whole process so far).
``peak_bytes(fn, device)`` measures one callable's peak of live tensor bytes instead (the benchmarks' memory column
and the tests of the fused head's saving).
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from softprompts.model.frozen import FrozenBase


@dataclass
class Latency:
    """Milliseconds, medians over repeats; ``prompt_tokens`` real tokens in the timed prompt."""

    ttft_ms: float  # prefill -> first token
    per_token_ms: float  # each further token from the cache
    prompt_tokens: int
    new_tokens: int
    repeats: int

    def to_json(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure_latency(base: FrozenBase, prompt: str | list[int], artifact=None, new_tokens: int = 8,
                    repeats: int = 3) -> Latency:
    """TTFT and per-token latency of our decode loop for one prompt (text or token ids) with ``artifact`` (None =
    bare model)."""
    ids = torch.tensor([prompt if isinstance(prompt, list) else base.tokenize(prompt)], device=base.device)  # [1, T]

    def prefill():  # on an encoder-decoder base the encoder reads the prompt, the decoder its start token
        state = base.prefill(ids, artifact)
        return state, state.logits[:, -1].argmax(-1)

    ttft = _median_ms(prefill, repeats, base.device)

    def decode_all() -> None:
        state, token = prefill()
        for _ in range(new_tokens - 1):
            state = base.decode_next(state, token)
            token = state.logits[:, -1].argmax(-1)

    total = _median_ms(decode_all, repeats, base.device)
    per_token = max(total - ttft, 0.0) / max(new_tokens - 1, 1)
    return Latency(ttft, per_token, ids.shape[1], new_tokens, repeats)


@torch.no_grad()
def measure_hf_latency(model, base: FrozenBase, prompt: str, new_tokens: int = 8, repeats: int = 3) -> Latency:
    """The same two numbers through Hugging Face ``generate`` of ``model`` (a PEFT model over ``base.model``, or
    ``base.model`` itself beside it)."""
    device = next(model.parameters()).device
    ids = torch.tensor([base.tokenize(prompt)], device=device)  # [1, T]
    mask = torch.ones_like(ids)

    def gen(n: int) -> Callable[[], None]:
        return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=base.pad_id)

    ttft = _median_ms(gen(1), repeats, device)
    total = _median_ms(gen(new_tokens), repeats, device)
    per_token = max(total - ttft, 0.0) / max(new_tokens - 1, 1)
    return Latency(ttft, per_token, ids.shape[1], new_tokens, repeats)


def kv_bytes_per_position(base: FrozenBase) -> int:
    """Bytes one position of every layer's keys and values takes in a decode cache, ``sum_l 2 * H_l * D_l *
    element size`` over the probed KV layers (the count ``serve/admission.py`` reserves per token; on an
    encoder-decoder base it counts every layer of its KV layout, an upper bound)."""
    element = base.model.get_input_embeddings().weight.element_size()
    return sum(2 * h * d * element for h, d in zip(base.shapes.kv_heads, base.shapes.head_dims, strict=True))


# --- peak memory ------------------------------------------------------------------------------------------------


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> str:
    """Start a new peak-memory window; returns how the peak will be measured (written next to the number)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "torch.cuda.max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        if _vm_hwm_bytes() is not None:
            return "RSS high-water mark (VmHWM, reset per run)"
    except OSError:
        pass
    return "RSS high-water mark of the process (ru_maxrss, not resettable: includes earlier runs)"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since ``reset_peak_memory`` (see there for what is measured)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


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


def cpu_peak_from_profile(prof: profile) -> int:
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
