"""The served form of an adapter placed after a lead (``model/placement.py``), computed once per (adapter version,
lead) and kept in a small LRU.

A chat adapter whose soft prompt follows the system turn (or a template's fixed opening) sends every request the
same lead: its [lead + soft prompt] KV is computed on the first request and reused, so placement costs nothing per
request after that. A lead that varies (a soft prompt after a variable field or after earlier turns) makes one
entry per distinct lead; the LRU bounds them (``capacity``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from softprompts.model.artifacts import Artifact
from softprompts.model.placement import place


class PlacedArtifacts:
    """``get(key, source, lead)``: ``prepare(place(base, source, lead))``, cached under ``(key, lead)``."""

    def __init__(self, base, prepare: Callable[[Artifact | None], Artifact | None], capacity: int = 256) -> None:
        self.base, self.prepare, self.capacity = base, prepare, capacity
        self._cache: OrderedDict[tuple, Artifact | None] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple, source: Artifact | None, lead: tuple[int, ...]) -> Artifact | None:
        """``key`` names the adapter version (e.g. ``(name, version)``; ``("base",)`` for the bare model)."""
        index = (key, lead)
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                self.hits += 1
                return self._cache[index]
        served = self.prepare(place(self.base, source, lead))
        with self._lock:
            self.misses += 1
            self._cache[index] = served
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return served


__all__ = ["PlacedArtifacts"]
