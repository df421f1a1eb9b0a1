"""The server's metrics through ``prometheus-client`` (the maintained library for the exposition format), one
registry per server (no process-global state: tests and several apps in one process stay apart).

Every HTTP response is counted by endpoint and status, 5xx included (the app's middleware counts what the error
handlers answer); per adapter the requests, prompt tokens and generated tokens; the scheduler's running rows,
waiting requests, the KV cache bytes the running rows hold and the requests admission control refused (by reason);
histograms of latency, time to first token, queue wait, rows per decode step and distinct adapters per step.
``GET /metrics`` serves ``render()`` (Prometheus text format 0.0.4).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The metrics of one server (attributes are prometheus-client metrics on ``registry``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("softprompts_requests", "HTTP responses by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("softprompts_request_latency_seconds", "Request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_requests = Counter("softprompts_adapter_requests", "Generation and scoring requests per adapter",
                                        ["adapter"], registry=r)
        self.prompt_tokens = Counter("softprompts_prompt_tokens", "Prompt tokens processed, per adapter", ["adapter"],
                                     registry=r)
        self.generated_tokens = Counter("softprompts_generated_tokens", "Tokens generated, per adapter", ["adapter"],
                                        registry=r)
        self.time_to_first_token = Histogram("softprompts_time_to_first_token_seconds",
                                             "Time from a request's prefill to its first token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("softprompts_queue_wait_seconds", "Time a request waited to be admitted",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("softprompts_batch_size", "Rows per decode step (requests sharing a forward)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_adapters = Histogram("softprompts_batch_adapters", "Distinct adapters per decode step",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.running = Gauge("softprompts_running_rows", "Rows being decoded", registry=r)
        self.waiting = Gauge("softprompts_waiting_requests", "Requests waiting for admission", registry=r)
        self.kv_bytes = Gauge("softprompts_kv_cache_bytes", "KV cache bytes the running rows hold", registry=r)
        self.finished = Counter("softprompts_finished_rows", "Generation rows that ended, by finish reason (stop, "
                                "length, cancelled: the client left, timeout)", ["reason"], registry=r)
        self.rejected = Counter("softprompts_rejected", "Requests refused by admission control, by reason",
                                ["reason"], registry=r)

    def tokens(self, adapter: str, prompt: int, generated: int) -> None:
        self.adapter_requests.labels(adapter).inc()
        self.prompt_tokens.labels(adapter).inc(prompt)
        self.generated_tokens.labels(adapter).inc(generated)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["BATCH_BUCKETS", "CONTENT_TYPE", "LATENCY_BUCKETS", "Metrics"]
