"""The time-window batcher that continuous batching replaced, kept for comparison: the reference of
``test_scheduler.py``'s window test and the "window" system of ``benchmarks/load_open_loop.py`` (which imports it from
here: the tests never import from ``benchmarks/``).

A batch is formed from the requests arriving within ``window_s`` of the first and runs to its end before the next
one starts, so a request arriving meanwhile waits for the longest request in flight. Built on the server's own
``Scheduler`` with no chunked prefill and no prefill budget (``prefill_chunk=None``): only admission differs.
"""

from __future__ import annotations

import time

from softprompts.model.generation import GenerationRequest
from softprompts.serve.scheduler import Scheduler


class WindowScheduler(Scheduler):
    """``Scheduler`` whose admission waits for a window and starts a batch only once the last one ended."""

    def __init__(self, engine, window_s: float, **kwargs) -> None:
        super().__init__(engine, prefill_chunk=None, **kwargs)
        self.window_s = window_s

    def _admit(self) -> list:
        first = next((j for j in self._waiting if isinstance(j.request, GenerationRequest)), None)
        if self.running or first is None:
            return []
        wait = first.submitted + self.window_s - time.perf_counter()
        if wait > 0 and len(self._waiting) < self.admission.max_running:
            self._cv.wait(wait)  # collect the window (the lock is released while waiting), then look again
            return []
        return super()._admit()


__all__ = ["WindowScheduler"]
