"""What a server holds: the engine, the adapter registry, the batching worker, metrics, and the placed artifacts
(an adapter after a lead: ``placed.py``). Built once by ``build_state``; the HTTP layer only reads it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from softprompts.data.chat import ChatFormat
from softprompts.model.artifacts import Artifact
from softprompts.serve.batcher import Batcher
from softprompts.serve.engine import Engine
from softprompts.serve.metrics import Metrics
from softprompts.serve.placed import PlacedArtifacts
from softprompts.serve.registry import Entry, Registry


@dataclass
class ServerState:
    base: object
    engine: Engine
    registry: Registry
    batcher: Batcher
    metrics: Metrics
    placed: PlacedArtifacts

    def artifact(self, entry: Entry | None, lead: tuple[int, ...] = ()) -> Artifact | None:
        """What a row runs with: the adapter's served artifact (``None`` = the base model), placed after ``lead``
        when the row has one (computed once per adapter version and lead)."""
        if not lead:
            return entry.artifact if entry is not None else None
        if entry is None:
            return self.placed.get(("base",), None, lead)
        return self.placed.get((entry.name, entry.version), entry.source, lead)

    def chat_format(self, entry: Entry | None) -> ChatFormat:
        """How a conversation is rendered for ``entry``: its chat task's placement and system message, else the
        model's chat template with the virtual tokens first."""
        chat = ((entry.task if entry is not None else {}) or {}).get("chat") or {}
        return ChatFormat(self.base.tokenizer, chat.get("placement", "start"), chat.get("system"), "generate")


def build_state(
    base,
    adapters: str | Path,
    *,
    window_ms: float = 10.0,
    max_batch: int = 32,
    max_adapter_bytes: int = 1 << 30,
    poll_s: float = 2.0,
) -> ServerState:
    """Engine + registry (soft prompts converted to KV once, on load) + batching worker, not started yet."""
    metrics = Metrics()
    engine = Engine(base, max_batch=max_batch)
    registry = Registry(base, adapters, prepare=engine.prepare, max_bytes=max_adapter_bytes, poll_s=poll_s)
    batcher = Batcher(engine, window_s=window_ms / 1000, max_batch=max_batch, metrics=metrics)
    return ServerState(base=base, engine=engine, registry=registry, batcher=batcher, metrics=metrics,
                       placed=PlacedArtifacts(base, engine.prepare))


__all__ = ["ServerState", "build_state"]
