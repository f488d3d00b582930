"""Prometheus metrics, one registry per app (so several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """All metrics of one app instance."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "zsi_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "zsi_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "zsi_stage_seconds",
            "Time per /inspect stage (decode, queue_wait, inference, model stages, render)",
            ["method", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_lookups = Counter(
            "zsi_cache_lookups", "Cache lookups by kind and result", ["kind", "result"], registry=r
        )
        self.cache_corrupt = Counter(
            "zsi_cache_corrupt",
            "Corrupt entries found in the cache or store (dropped, treated as a miss)",
            ["kind"],
            registry=r,
        )
        self.cache_backend_up = Gauge(
            "zsi_cache_backend_up", "1 when the configured shared cache (Redis) answers", registry=r
        )
        self.queue_depth = Gauge("zsi_queue_depth", "Requests waiting per method", ["method"], registry=r)
        self.batch_size = Histogram(
            "zsi_batch_size", "Images per forward batch", ["method"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.batches = Counter("zsi_batches", "Forward batches run", ["method"], registry=r)
        self.rejected = Counter(
            "zsi_rejected", "Requests refused by the queue", ["method", "reason"], registry=r
        )
        self.models_loaded = Gauge("zsi_model_loaded", "1 when a method is loaded", ["method"], registry=r)
        self.references_encoded = Counter(
            "zsi_references_encoded", "Golden images encoded", ["method"], registry=r
        )

    def cache_lookup(self, kind: str, hit: bool) -> None:
        self.cache_lookups.labels(kind=kind, result="hit" if hit else "miss").inc()
