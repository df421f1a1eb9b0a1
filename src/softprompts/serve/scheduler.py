"""Iteration-level (continuous) batching on one worker thread that owns the model, with admission control.

Callers (the HTTP layer, any thread) ``submit`` a request and get a ``concurrent.futures.Future``. The worker loops:

    1. scoring requests waiting -> one batched forward (they end in one step)
    2. admit waiting generation requests, first come first served, within ``admission.py``'s bounds; prefill them
       together (at most ``prefill_chunk`` prompt tokens) and let them join the running batch (the base model's
       decode loop, ``FrozenBase.new_batch``, driven through ``model/decode_loop.DecodeLoop``). A longer prompt the
       batch prefills alone, one chunk per step, where its family prefills in chunks (decoder-only:
       ``model/decoder/chunked_prefill.py``, ``benchmarks/prefill_stall.py``)
    3. one decode step for every running row; rows that end leave at once (their futures resolve)
    4. rows whose client left (``cancel``) or whose deadline passed leave before the next step

``prefill_chunk=None``: no chunking and no prefill budget (the window batcher of ``tests/window_scheduler.py``,
which this replaced, builds on that).

Beyond the bounds of ``admission.py`` ``submit`` raises ``Overloaded`` (HTTP 429). Each row's tokens are what the
request gives alone, whatever joins or leaves around it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from softprompts.model.generation import GenerationRequest, GenerationResult
from softprompts.serve.admission import Admission
from softprompts.serve.engine import Engine, OneStepRequest
from softprompts.serve.metrics import Metrics


@dataclass
class _Job:
    request: GenerationRequest | OneStepRequest
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # time.perf_counter() by which the row leaves (finish reason "timeout")
    cancelled: bool = False  # the client left
    kv_bytes: int = 0


class Scheduler:
    """``submit(request) -> Future`` of a ``GenerationResult`` (or of what ``Engine.one_step`` answers for a scoring
    or prompt-logprobs request)."""

    def __init__(self, engine: Engine, max_running: int = 32, max_waiting: int = 256, max_kv_bytes: int | None = None,
                 prefill_chunk: int | None = 512, metrics: Metrics | None = None,
                 timeout_s: float | None = None) -> None:
        self.engine = engine
        self.timeout_s = timeout_s  # the default deadline of a request (None: none)
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics or Metrics()
        self.admission = Admission(engine.base, max_running, max_waiting, max_kv_bytes, self.metrics)
        self._waiting: deque[_Job] = deque()
        self._jobs: dict[int, _Job] = {}  # id(request) -> job, for the running rows
        self._batch = self._new_batch()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- the callers' side ----------------------------------------------------------------------------------------
    def start(self) -> Scheduler:
        """Start the worker (again after ``stop``: an app's lifespan may run more than once in one process)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, request: GenerationRequest | OneStepRequest, timeout_s: float | None = None) -> Future:
        """Queue ``request``; ``Overloaded`` when the queue is full or it could never fit the KV budget. A row still
        decoding ``timeout_s`` (default: the scheduler's) after submission ends as ``timeout`` with its tokens."""
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        timeout_s = timeout_s or self.timeout_s
        job = _Job(request, deadline=time.perf_counter() + timeout_s if timeout_s else None,
                   kv_bytes=self.admission.cost(request))
        with self._cv:
            self.admission.check_queue(len(self._waiting))
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._cv.notify()
        job.future.add_done_callback(lambda f, j=job: self._cancel_if_abandoned(f, j))
        return job.future

    def cancel(self, future: Future) -> None:
        """The client left: its row leaves at the next step (or it never starts)."""
        future.cancel()

    def _cancel_if_abandoned(self, future: Future, job: _Job) -> None:
        if future.cancelled():
            job.cancelled = True

    @property
    def pending(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows decoding or being prefilled."""
        return len(self._batch) + len(self._batch.prefilling)

    # -- the worker ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self.running:
                    self._cv.wait()
                if self._stopping:
                    break
                scoring = [j for j in self._waiting if not isinstance(j.request, GenerationRequest)]
                for job in scoring:
                    self._waiting.remove(job)
                arrivals = self._admit()
                self.metrics.waiting.set(len(self._waiting))
            if scoring:
                self._score(scoring)
            if arrivals:
                self._join(arrivals)
            self._drop_abandoned()
            if self._batch.prefilling:
                self._advance_prefill()
            if len(self._batch):
                self._step()
        self._fail_all(RuntimeError("the server shut down before this request finished"))

    def _admit(self) -> list[_Job]:
        """Waiting generation jobs that fit now, in arrival order (called under the lock)."""
        admitted, prompt_tokens = [], 0
        for job in list(self._waiting):
            if not isinstance(job.request, GenerationRequest):
                continue
            if job.cancelled:
                self._waiting.remove(job)
                continue
            length = len(job.request.prompt_ids) + (job.request.artifact.length if job.request.artifact else 0)
            batched = not self._batch.prefills_alone(job.request)
            fits = (self.admission.fits(self.running + len(admitted), job.kv_bytes)
                    and (not batched or not prompt_tokens or self.prefill_chunk is None
                         or prompt_tokens + len(job.request.prompt_ids) <= self.prefill_chunk)
                    and self._batch.can_join(length))
            if not fits:
                break  # first come, first served: later arrivals do not overtake
            self._waiting.remove(job)
            admitted.append(job)
            prompt_tokens += len(job.request.prompt_ids) if batched else 0
            self.admission.reserved += job.kv_bytes
        return admitted

    def _new_batch(self):
        return self.engine.base.new_batch(self.engine.eos_ids, on_finish=self._finished,
                                          prefill_chunk=self.prefill_chunk)

    def _join(self, jobs: list[_Job]) -> None:
        """Hand the admitted jobs to the batch (long prompts start prefilling in chunks); a request that fails its
        checks fails alone."""
        started = time.perf_counter()
        for job in jobs:
            self.metrics.queue_wait.observe(started - job.submitted)
            self._jobs[id(job.request)] = job
        try:
            with self.engine.lock:
                self._batch.add([job.request for job in jobs])
        except Exception:  # noqa: BLE001 - find the bad request: the others still run
            for job in jobs:
                if not self._holds(job.request) and not job.future.done():
                    try:
                        with self.engine.lock:
                            self._batch.add([job.request])
                    except Exception as exc:  # noqa: BLE001
                        self._fail(job, exc)

    def _holds(self, request: GenerationRequest) -> bool:
        return any(r is request for r in self._batch.requests) or any(
            p.request is request for p in self._batch.prefilling)

    def _advance_prefill(self) -> None:
        """One chunk of the oldest long prompt (it joins the batch once its prompt is in); a failing chunk fails
        that request alone."""
        request = self._batch.prefilling[0].request
        try:
            with self.engine.lock:
                self._batch.advance_prefill()
        except Exception as exc:  # noqa: BLE001
            self._fail(self._jobs[id(request)], exc)

    def _step(self) -> None:
        self.metrics.batch_size.observe(len(self._batch))
        self.metrics.batch_adapters.observe(len({id(r.artifact) for r in self._batch.requests}))
        try:
            with self.engine.lock:
                self._batch.step()
        except Exception as exc:  # noqa: BLE001 - a failing step fails its rows, never the worker
            self._fail_all(exc, waiting=False)
        self.metrics.running.set(len(self._batch))
        self.metrics.kv_bytes.set(len(self._batch) * self._batch.cache_length() * self.admission.per_token)

    def _drop_abandoned(self) -> None:
        now = time.perf_counter()
        self._batch.cancel(lambda r: self._jobs[id(r)].cancelled, "cancelled")
        self._batch.cancel(lambda r: (self._jobs[id(r)].deadline or float("inf")) < now, "timeout")

    def _finished(self, request: GenerationRequest, result: GenerationResult) -> None:
        job = self._jobs.pop(id(request), None)
        if job is None:
            return
        self._release(job)
        self.metrics.finished.labels(result.finish_reason).inc()
        if result.tokens:
            self.metrics.time_to_first_token.observe(result.time_to_first_token_s)
        if not job.future.done():
            job.future.set_result(result)

    def _release(self, job: _Job) -> None:
        with self._cv:
            self.admission.reserved -= job.kv_bytes
            self._jobs.pop(id(job.request), None)

    def _fail(self, job: _Job, exc: Exception) -> None:
        self._release(job)
        if not job.future.done():
            job.future.set_exception(exc)

    def _score(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        try:
            results = self.engine.one_step([j.request for j in live])
        except Exception:  # noqa: BLE001 - isolate the failing request
            for job in live:
                try:
                    job.future.set_result(self.engine.one_step([job.request])[0])
                except Exception as exc:  # noqa: BLE001
                    job.future.set_exception(exc)
            return
        for job, result in zip(live, results, strict=True):
            job.future.set_result(result)

    def _fail_all(self, exc: Exception, waiting: bool = True) -> None:
        for job in list(self._jobs.values()):
            self._fail(job, exc)
        self._batch = self._new_batch()
        if not waiting:
            return
        with self._cv:
            for job in self._waiting:
                if not job.future.done():
                    job.future.set_exception(exc)
            self._waiting.clear()


__all__ = ["Scheduler"]
