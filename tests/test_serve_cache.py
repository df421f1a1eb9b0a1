"""One artifact cache under one byte budget: the registry's loaded adapters and their placed artifacts (an adapter's
served form after a lead, keyed by (name, version, lead)) share ``max_bytes`` (``--max-adapter-memory-mb``) and one
least-recently-used order."""

from __future__ import annotations

import os
import time

import torch
from tiny import perturbed, tiny_base

import softprompts as sp
from softprompts.serve.engine import Engine
from softprompts.serve.registry import Registry, nbytes


def save(base, directory, n=4, seed=0):
    tuned = perturbed(base, "prompt", n, "abcdefgh"[:n], scale=0.1, seed=seed)
    return sp.save_adapter(sp.Adapter.from_method(tuned, base, task={"task": "generate"}), directory, overwrite=True)


def leads(count: int) -> list[tuple[int, ...]]:
    return [(10 + i, 20 + i, 30 + i) for i in range(count)]


def test_placements_count_against_the_adapter_budget_and_are_evicted_oldest_first(tmp_path):
    base = tiny_base("llama")
    engine = Engine(base)
    save(base, tmp_path / "a")
    adapter = engine.prepare(sp.load_adapter(tmp_path / "a", base).artifact)
    placement = nbytes(engine.prepare(base.served(sp.load_adapter(tmp_path / "a", base), leads(1)[0])))
    budget = nbytes(adapter) + 3 * placement  # the adapter and three placements
    reg = Registry(base, tmp_path, prepare=engine.prepare, max_bytes=budget, poll_s=0)
    entry = reg.get("a")
    first = [reg.placed(entry, lead) for lead in leads(3)]
    assert reg.loaded_bytes() == budget and reg.placed_misses == 3
    for lead, placed in zip(leads(3), first, strict=True):  # the real placement, computed once
        assert reg.placed(entry, lead) is placed
        want = base.served(entry.source, lead)
        torch.testing.assert_close(placed.keys[0], want.keys[0])
    assert reg.placed_hits == 3
    reg.get("a")  # the adapter is now the most recent: the next placement evicts leads(3)[0], the oldest
    reg.placed(entry, leads(4)[3])
    assert reg.loaded_bytes() <= budget and reg.placed_misses == 4
    assert reg.placed(entry, leads(1)[0]) is not first[0] and reg.placed_misses == 5  # evicted: computed again
    assert reg.placed(entry, leads(4)[3]) is not None and reg.placed_hits == 4  # still there
    assert reg.loaded_bytes() <= budget


def test_placements_can_evict_the_adapter_and_a_new_version_drops_its_placements(tmp_path):
    base = tiny_base("llama")
    engine = Engine(base)
    save(base, tmp_path / "a")
    save(base, tmp_path / "b", seed=1)
    one = nbytes(engine.prepare(sp.load_adapter(tmp_path / "a", base).artifact))
    reg = Registry(base, tmp_path, prepare=engine.prepare, max_bytes=int(one * 2.5), poll_s=0)
    held = reg.get("a")
    for lead in leads(3):  # each placement (3 + 4 positions) outweighs an adapter (4): a and b go first
        reg.placed(held, lead)
    assert reg.loaded_bytes() <= int(one * 2.5)
    assert {e.name: e.artifact is None for e in reg.entries()} == {"a": True, "b": True}
    assert held.artifact is not None  # a request's entry keeps its tensors
    assert reg.get("a").artifact is not None  # reloads
    reg.placed(held, leads(1)[0])
    misses = reg.placed_misses
    time.sleep(0.01)
    save(base, tmp_path / "a", n=5, seed=3)
    os.utime(tmp_path / "a" / "adapter.json")
    assert reg.scan() == ["a"] and reg.get("a").version == 2
    reg.placed(held, leads(1)[0])  # a request still holding version 1: computed again (its placement was dropped)
    reg.placed(held, leads(1)[0])  # ... and not cached under a version the registry no longer serves
    assert reg.placed_misses == misses + 2
    fresh = reg.get("a")
    assert reg.placed(fresh, leads(1)[0]).length == 3 + 5 and reg.placed_misses == misses + 3
    assert reg.placed(fresh, leads(1)[0]) is reg.placed(fresh, leads(1)[0]) and reg.placed_misses == misses + 3
    held_bytes = reg.loaded_bytes()  # a's placement (it evicted a itself: 8 positions against 5)
    reg.unload("a")  # its placements leave the budget with it
    assert held_bytes > 0 and reg.loaded_bytes() == 0
