"""What a server holds: the engine, the adapter registry (with the placed artifacts: an adapter after a lead, in the
same byte budget), the scheduler (continuous batching) and metrics. Built once by ``build_state``; the HTTP layer
only reads it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from softprompts.data.chat import ChatFormat
from softprompts.model.artifacts import Artifact
from softprompts.serve.engine import Engine
from softprompts.serve.metrics import Metrics
from softprompts.serve.plan import PromptPlan, chat_format_of
from softprompts.serve.registry import Entry, Registry
from softprompts.serve.scheduler import Scheduler


@dataclass
class ServerState:
    base: object
    engine: Engine
    registry: Registry
    scheduler: Scheduler
    metrics: Metrics
    started: float = field(default_factory=time.time)

    def artifact(self, entry: Entry | None, lead: tuple[int, ...] = ()) -> Artifact | None:
        """What a row runs with: the adapter's served artifact (``None`` = the base model), placed after ``lead``
        when the row has one (computed once per adapter version and lead: ``Registry.placed``)."""
        return self.registry.placed(entry, lead)

    def artifacts(self, entry: Entry | None, prompts: list[PromptPlan]) -> list[Artifact | None]:
        """What each planned prompt runs with (``artifact`` after its lead): may compute a placement, so the routes
        call it in a thread."""
        return [self.artifact(entry, p.lead) for p in prompts]

    def chat_format(self, entry: Entry | None) -> ChatFormat:
        return chat_format_of(self.base, entry)


def build_state(
    base,
    adapters: str | Path,
    *,
    max_running: int = 32,
    max_waiting: int = 256,
    max_kv_bytes: int | None = None,
    max_adapter_bytes: int = 1 << 30,
    poll_s: float = 2.0,
    request_timeout_s: float | None = None,
    prefill_chunk: int = 512,
) -> ServerState:
    """Engine + registry (soft prompts converted to KV once, on load) + scheduler, not started yet.

    ``max_running`` rows decode together, ``max_waiting`` requests queue, ``max_kv_bytes`` bounds the KV the running
    rows may hold (``None``: only ``max_running``); ``request_timeout_s`` ends a generation still running after that
    long (finish reason ``timeout``); a prompt longer than ``prefill_chunk`` tokens is prefilled in chunks between
    decode steps."""
    metrics = Metrics()
    engine = Engine(base, max_batch=max_running)
    registry = Registry(base, adapters, prepare=engine.prepare, max_bytes=max_adapter_bytes, poll_s=poll_s)
    scheduler = Scheduler(engine, max_running=max_running, max_waiting=max_waiting, max_kv_bytes=max_kv_bytes,
                          metrics=metrics, timeout_s=request_timeout_s, prefill_chunk=prefill_chunk)
    return ServerState(base=base, engine=engine, registry=registry, scheduler=scheduler, metrics=metrics)


__all__ = ["ServerState", "build_state"]
