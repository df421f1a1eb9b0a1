"""Dynamic batching: one background thread owns the engine; requests arriving within a window share a forward.

Callers (the HTTP layer, from any thread or event loop) submit a request and get a ``concurrent.futures.Future``
(``asyncio.wrap_future`` turns it into an awaitable). The worker takes the first waiting request, keeps collecting
for ``window_s`` seconds (or until ``max_batch`` rows), then runs all scoring requests in one batched forward and all
generation requests as one mixed-adapter batch. A batch that fails is retried row by row, so one bad request never
fails the others.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from softprompts.model.decode import GenerationRequest
from softprompts.serve.engine import Engine, ScoreRequest
from softprompts.serve.metrics import BATCH_BUCKETS, Metrics


@dataclass
class _Job:
    request: GenerationRequest | ScoreRequest
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


class Batcher:
    """``submit(request) -> Future`` of ``GenerationResult`` (or of ``list[float]`` scores for a ``ScoreRequest``)."""

    def __init__(self, engine: Engine, window_s: float = 0.01, max_batch: int = 32, metrics: Metrics | None = None):
        self.engine = engine
        self.window_s = window_s
        self.max_batch = max_batch
        self.metrics = metrics or Metrics()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> Batcher:
        """Start the worker (again after ``stop``: an app's lifespan may run more than once in one process)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, request: GenerationRequest | ScoreRequest) -> Future:
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        job = _Job(request)
        self._queue.put(job)
        return job.future

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _collect(self, first: _Job) -> list[_Job]:
        jobs = [first]
        deadline = time.perf_counter() + self.window_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # keep the stop signal for the loop
                break
            jobs.append(job)
        return jobs

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            jobs = [j for j in self._collect(first) if j.future.set_running_or_notify_cancel()]
            started = time.perf_counter()
            for job in jobs:
                self.metrics.observe("softprompts_queue_wait_seconds", started - job.submitted)
            scoring = [j for j in jobs if isinstance(j.request, ScoreRequest)]
            generating = [j for j in jobs if isinstance(j.request, GenerationRequest)]
            if scoring:
                self._execute(scoring, self.engine.score)
            if generating:
                self._execute(generating, self.engine.generate)

    def _execute(self, jobs: list[_Job], run) -> None:
        self.metrics.observe("softprompts_batch_size", len(jobs), BATCH_BUCKETS)
        adapters = len({id(j.request.artifact) for j in jobs})
        self.metrics.observe("softprompts_batch_adapters", adapters, BATCH_BUCKETS)
        try:
            results = run([j.request for j in jobs])
        except Exception as exc:  # noqa: BLE001 - isolate the failing request below
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            for job in jobs:
                self._execute([job], run)
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)
