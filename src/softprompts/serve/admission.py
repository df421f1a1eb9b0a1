"""Admission control: the bounds a server admits work within, and the 429 it answers beyond them.

A generation request's KV is counted at its worst case, ``(virtual + prompt + max_new_tokens) x bytes per token``,
with ``bytes per token = sum_l 2 * H_l * D_l * element size`` from the probed per-layer key/value heads and head
dims. Beyond ``max_waiting`` queued requests, or for a request that alone exceeds the KV budget, ``Overloaded``
(HTTP 429 with ``Retry-After``) instead of letting memory grow; the scheduler admits a waiting request only while
the running rows stay within ``max_running`` and their reserved KV within ``max_kv_bytes``.
"""

from __future__ import annotations

from softprompts.errors import SoftpromptsError
from softprompts.model.generation import GenerationRequest
from softprompts.serve.metrics import Metrics


class Overloaded(SoftpromptsError):
    """Admission control refused a request; ``retry_after`` seconds is the advice."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def kv_bytes_per_token(base) -> int:
    """Bytes one position of every layer's keys and values takes: ``sum_l 2 * H_l * D_l * element size``."""
    shapes = base.shapes
    element = base.model.get_input_embeddings().weight.element_size()
    return sum(2 * h * d * element for h, d in zip(shapes.kv_heads, shapes.head_dims, strict=True))


class Admission:
    """The running-row, waiting-queue and KV bounds, and the KV reserved by the running rows (the caller locks)."""

    def __init__(self, base, max_running: int, max_waiting: int, max_kv_bytes: int | None, metrics: Metrics) -> None:
        self.max_running, self.max_waiting, self.max_kv_bytes = max_running, max_waiting, max_kv_bytes
        self.metrics = metrics
        self.per_token = kv_bytes_per_token(base)
        self.reserved = 0  # worst-case KV bytes of the running rows

    def cost(self, request) -> int:
        """A request's worst-case KV bytes (0 for a one-step scoring request); ``Overloaded`` if it alone exceeds
        the budget."""
        if not isinstance(request, GenerationRequest):
            return 0
        virtual = request.artifact.length if request.artifact is not None else 0
        kv_bytes = (virtual + len(request.prompt_ids) + request.max_new_tokens) * self.per_token
        if self.max_kv_bytes is not None and kv_bytes > self.max_kv_bytes:
            self.metrics.rejected.labels("kv_budget").inc()
            raise Overloaded(f"the request needs {kv_bytes / 2**20:.1f} MiB of KV cache, more than this server's "
                             f"budget of {self.max_kv_bytes / 2**20:.1f} MiB; shorten it", retry_after=60)
        return kv_bytes

    def check_queue(self, waiting: int) -> None:
        if waiting >= self.max_waiting:
            self.metrics.rejected.labels("queue_full").inc()
            raise Overloaded(f"the server is at capacity ({self.max_waiting} requests waiting); retry shortly")

    def fits(self, running: int, kv_bytes: int) -> bool:
        """Whether one more row of ``kv_bytes`` fits beside ``running`` rows."""
        return running < self.max_running and (
            self.max_kv_bytes is None or self.reserved + kv_bytes <= self.max_kv_bytes)


__all__ = ["Admission", "Overloaded", "kv_bytes_per_token"]
