"""The server's Prometheus metrics, in a registry of their own (several apps can live in one
process, as in the tests). Exposed as text at GET /metrics by prometheus-client."""
from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATE_WINDOW_S = 10.0


class ServeMetrics:
    def __init__(self, buckets: list[int]):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("flowtok_serve_queue_depth", "images waiting in the queue", registry=r)
        self.batch_size = Histogram("flowtok_serve_batch_size", "real rows per model batch (padding excluded)",
                                    ["kind"], buckets=sorted(buckets), registry=r)
        self.padding_rows = Counter("flowtok_serve_padding_rows", "padding rows run to fill a bucket",
                                    ["kind"], registry=r)
        self.stage_seconds = Histogram("flowtok_serve_stage_seconds", "latency per stage: queue (per request); "
                                       "text, flow, decode (per batch)", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("flowtok_serve_request_seconds", "request latency, arrival to response",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("flowtok_serve_images", "images generated", registry=r)
        self.images_per_second = Gauge("flowtok_serve_images_per_second",
                                       f"images generated per second over the last {RATE_WINDOW_S:.0f} s", registry=r)
        self.rejected = Counter("flowtok_serve_rejected_requests", "requests refused, by reason",
                                ["reason"], registry=r)
        self.responses = Counter("flowtok_serve_responses", "responses sent, by HTTP status code", ["code"], registry=r)
        self._recent = collections.deque()  # (time, images)
        self._lock = threading.Lock()

    def record_batch(self, kind: str, rows: int, bucket: int, seconds: dict) -> None:
        self.batch_size.labels(kind).observe(rows)
        self.padding_rows.labels(kind).inc(bucket - rows)
        for stage, s in seconds.items():
            self.stage_seconds.labels(stage).observe(s)
        if kind == "images":
            self.images.inc(rows)
            with self._lock:
                self._recent.append((time.monotonic(), rows))

    def render(self) -> bytes:
        with self._lock:
            now = time.monotonic()
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            self.images_per_second.set(sum(n for _, n in self._recent) / RATE_WINDOW_S)
        return generate_latest(self.registry)
