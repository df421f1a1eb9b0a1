"""Prometheus text-format metrics, hand-rolled (~80 lines) rather than a ``prometheus-client`` dependency.

The server needs counters and histograms only, exposed on ``GET /metrics`` in the text format
(https://prometheus.io/docs/instrumenting/exposition_formats/); ``prometheus-client`` is not installed here and
would add a dependency (and its global registry) for what fits in one small, thread-safe class.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

HELP = {
    "softprompts_requests_total": ("counter", "HTTP requests by endpoint and status code"),
    "softprompts_prompt_tokens_total": ("counter", "Prompt tokens processed"),
    "softprompts_generated_tokens_total": ("counter", "Tokens generated"),
    "softprompts_batch_size": ("histogram", "Rows per engine batch (requests sharing a forward)"),
    "softprompts_batch_adapters": ("histogram", "Distinct adapters per engine batch"),
    "softprompts_request_latency_seconds": ("histogram", "Request latency by endpoint"),
    "softprompts_time_to_first_token_seconds": ("histogram", "Time from batch start to the first token"),
    "softprompts_queue_wait_seconds": ("histogram", "Time a request waited for its batch"),
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metrics:
    """Counters and histograms keyed by (name, sorted labels)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple, float] = defaultdict(float)
        self._hist: dict[tuple, list] = {}  # key -> [bucket counts..., sum, count]
        self._buckets: dict[str, tuple] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, name: str, value: float, buckets: tuple = LATENCY_BUCKETS, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._buckets.setdefault(name, buckets)
            bounds = self._buckets[name]
            h = self._hist.setdefault(key, [0] * len(bounds) + [0.0, 0])
            for i, bound in enumerate(bounds):
                if value <= bound:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        """The Prometheus text exposition of every metric seen so far."""
        lines: list[str] = []
        with self._lock:
            names = sorted({k[0] for k in self._counters} | {k[0] for k in self._hist})
            for name in names:
                kind, text = HELP.get(name, ("untyped", name))
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                for (n, labels), value in sorted(self._counters.items()):
                    if n == name:
                        lines.append(f"{name}{_labels(dict(labels))} {value:g}")
                for (n, labels), h in sorted(self._hist.items()):
                    if n != name:
                        continue
                    for bound, count in zip(self._buckets[name], h, strict=False):
                        lines.append(f"{name}_bucket{_labels({**dict(labels), 'le': f'{bound:g}'})} {count}")
                    lines.append(f"{name}_bucket{_labels({**dict(labels), 'le': '+Inf'})} {h[-1]}")
                    lines.append(f"{name}_sum{_labels(dict(labels))} {h[-2]:g}")
                    lines.append(f"{name}_count{_labels(dict(labels))} {h[-1]}")
        return "\n".join(lines) + "\n"
