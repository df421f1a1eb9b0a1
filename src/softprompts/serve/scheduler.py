"""Iteration-level (continuous) batching on one worker thread that owns the model, with admission control.

Callers (the HTTP layer, any thread) ``submit`` a request and get a ``concurrent.futures.Future``. The worker loops:

    1. scoring requests waiting -> one batched forward (they end in one step)
    2. admit waiting generation requests, first come first served, within ``admission.py``'s bounds; prefill them
       together (at most ``prefill_chunk`` prompt tokens) and let them join the running batch (``decode.new_batch``:
       the decode loop of a decoder-only or an encoder-decoder base). On decoder-only bases a longer prompt is
       prefilled alone, one chunk per step (``model/chunked_prefill.py``, ``benchmarks/prefill_stall.py``)
    3. one decode step for every running row; rows that end leave at once (their futures resolve)
    4. rows whose client left (``cancel``) or whose deadline passed leave before the next step

``window_s`` turns this into the time-window batcher it replaced (for comparison in ``benchmarks/load_open_loop.py``):
a batch is formed from the requests arriving within ``window_s`` of the first and runs to its end before the next
one starts, so a request arriving meanwhile waits for the longest request in flight.

Beyond the bounds of ``admission.py`` ``submit`` raises ``Overloaded`` (HTTP 429). Each row's tokens are what the
request gives alone, whatever joins or leaves around it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from softprompts.model.chunked_prefill import ChunkedPrefill
from softprompts.model.decode import new_batch
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
                 prefill_chunk: int = 512, metrics: Metrics | None = None, window_s: float | None = None,
                 timeout_s: float | None = None) -> None:
        self.engine = engine
        self.timeout_s = timeout_s  # the default deadline of a request (None: none)
        self.window_s = window_s
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics or Metrics()
        self.admission = Admission(engine.base, max_running, max_waiting, max_kv_bytes, self.metrics)
        self._waiting: deque[_Job] = deque()
        self._jobs: dict[int, _Job] = {}  # id(request) -> job, for the running rows
        self._prefilling: deque[tuple[_Job, ChunkedPrefill]] = deque()  # long prompts, one chunk per step
        self._batch = new_batch(engine.base, engine.eos_ids, on_finish=self._finished)
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
        return len(self._batch) + len(self._prefilling)

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
            short = [j for j in arrivals if not self._chunked(j)]
            if short:
                self._join(short)
            for job in arrivals:
                if self._chunked(job):
                    self._start_prefill(job)
            self._drop_abandoned()
            if self._prefilling:
                self._advance_prefill()
            if len(self._batch):
                self._step()
        self._fail_all(RuntimeError("the server shut down before this request finished"))

    def _admit(self) -> list[_Job]:
        """Waiting generation jobs that fit now, in arrival order (called under the lock)."""
        admitted, prompt_tokens = [], 0
        if self.window_s is not None:  # window batching: a new batch only once the last one ended
            first = next((j for j in self._waiting if isinstance(j.request, GenerationRequest)), None)
            if self.running or first is None:
                return []
            wait = first.submitted + self.window_s - time.perf_counter()
            if wait > 0 and len(self._waiting) < self.admission.max_running:
                self._cv.wait(wait)  # collect the window (the lock is released while waiting), then look again
                return []
        for job in list(self._waiting):
            if not isinstance(job.request, GenerationRequest):
                continue
            if job.cancelled:
                self._waiting.remove(job)
                continue
            length = len(job.request.prompt_ids) + (job.request.artifact.length if job.request.artifact else 0)
            batched = not self._chunked(job)
            fits = (self.admission.fits(self.running + len(admitted), job.kv_bytes)
                    and (not batched or not prompt_tokens or self.window_s is not None
                         or prompt_tokens + len(job.request.prompt_ids) <= self.prefill_chunk)
                    and self._batch.can_join(length))
            if not fits:
                break  # first come, first served: later arrivals do not overtake
            self._waiting.remove(job)
            admitted.append(job)
            prompt_tokens += len(job.request.prompt_ids) if batched else 0
            self.admission.reserved += job.kv_bytes
        return admitted

    def _join(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        for job in jobs:
            self.metrics.queue_wait.observe(started - job.submitted)
            self._jobs[id(job.request)] = job
        try:
            with self.engine.lock:
                self._batch.add([job.request for job in jobs])
        except Exception:  # noqa: BLE001 - find the bad request: the others still run
            for job in jobs:
                if id(job.request) not in {id(r) for r in self._batch.requests} and not job.future.done():
                    try:
                        with self.engine.lock:
                            self._batch.add([job.request])
                    except Exception as exc:  # noqa: BLE001
                        self._fail(job, exc)

    def _chunked(self, job: _Job) -> bool:
        """A prompt longer than one chunk is prefilled in chunks, alone (window batching never chunks)."""
        long = len(job.request.prompt_ids) > self.prefill_chunk
        return long and self.window_s is None and self._batch.prefills_in_chunks

    def _start_prefill(self, job: _Job) -> None:
        try:
            self._prefilling.append((job, ChunkedPrefill(self.engine.base, job.request, self.prefill_chunk)))
        except Exception as exc:  # noqa: BLE001 - a request that fails its checks fails alone
            self._fail(job, exc)

    def _advance_prefill(self) -> None:
        """One chunk of the oldest long prompt; it joins the batch when its prompt is in."""
        job, prefill = self._prefilling[0]
        try:
            with self.engine.lock:
                prefill.advance()
        except Exception as exc:  # noqa: BLE001
            self._prefilling.popleft()
            self._fail(job, exc)
            return
        if not prefill.done:
            return
        length = prefill.state.attention_mask.shape[1]
        if not self._batch.can_join(length):
            return  # a sliding-window batch that cannot take it yet: it joins once that batch has ended
        self._prefilling.popleft()
        self.metrics.queue_wait.observe(prefill.started - job.submitted)
        self._jobs[id(job.request)] = job
        with self.engine.lock:
            self._batch.join(prefill)

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
        for job, prefill in list(self._prefilling):
            expired = (job.deadline or float("inf")) < now
            if job.cancelled or expired:
                self._prefilling.remove((job, prefill))
                self._jobs[id(job.request)] = job
                prefill.result.finish_reason = "cancelled" if job.cancelled else "timeout"
                self._finished(job.request, prefill.result)
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
        for job, _ in self._prefilling:
            self._jobs[id(job.request)] = job
        self._prefilling.clear()
        for job in list(self._jobs.values()):
            self._fail(job, exc)
        self._batch = new_batch(self.engine.base, self.engine.eos_ids, on_finish=self._finished)
        if not waiting:
            return
        with self._cv:
            for job in self._waiting:
                if not job.future.done():
                    job.future.set_exception(exc)
            self._waiting.clear()


__all__ = ["Scheduler"]
