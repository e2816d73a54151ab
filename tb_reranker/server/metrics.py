"""Prometheus metrics of the sidecar, in a registry of its own (several servers per process work).

Exposed by the HTTP app (``/metrics``) on ``--metrics-port``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _CacheCollector(Collector):
    """Reads the Reranker's K/V cache counters at scrape time."""

    def __init__(self, cache_stats: Callable[[], dict[str, Any] | None]) -> None:
        self._cache_stats = cache_stats

    def describe(self) -> list[Any]:
        return []  # dynamic: nothing to describe before a model is loaded

    def collect(self) -> Iterator[Any]:
        stats = self._cache_stats()
        if not stats:
            return
        hits = CounterMetricFamily("tb_kv_cache_hits", "K/V cache hits")
        hits.add_metric([], stats["hits"])
        misses = CounterMetricFamily("tb_kv_cache_misses", "K/V cache misses")
        misses.add_metric([], stats["misses"])
        rate = GaugeMetricFamily("tb_kv_cache_hit_ratio", "K/V cache hits / lookups")
        rate.add_metric([], stats["hit_rate"])
        size = GaugeMetricFamily("tb_kv_cache_entries", "videos held in the K/V cache")
        size.add_metric([], stats["size"])
        yield from (hits, misses, rate, size)


class ServerMetrics:
    """Request counts and latency (gRPC by method and code, HTTP by route and status), batch
    sizes, in-flight and shed calls of each surface, cache."""

    def __init__(self, cache_stats: Callable[[], dict[str, Any] | None] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tb_grpc_requests",
            "gRPC calls by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tb_grpc_request_seconds",
            "gRPC call latency (server side) by method and status code",
            ["method", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tb_batch_size",
            "calls fused into one device batch",
            ["kind"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "tb_grpc_in_flight", "limited gRPC calls in flight", registry=self.registry
        )
        self.shed = Counter(
            "tb_grpc_shed", "gRPC calls refused with RESOURCE_EXHAUSTED", registry=self.registry
        )
        self._add_http_metrics()
        if cache_stats is not None:
            self.registry.register(_CacheCollector(cache_stats))

    def _add_http_metrics(self) -> None:
        self.http_requests = Counter(
            "tb_http_requests",
            "provider HTTP requests by route and status (499: the client went away)",
            ["route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "tb_http_request_seconds",
            "provider HTTP request latency (server side, body read included) by route and "
            "status class",
            ["route", "status_class"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_in_flight = Gauge(
            "tb_http_in_flight", "limited HTTP requests in flight", registry=self.registry
        )
        self.http_shed = Counter(
            "tb_http_shed", "HTTP requests refused with 429", registry=self.registry
        )
        self.http_malformed = Counter(
            "tb_http_malformed",
            "HTTP requests the parser refused before routing (bad framing, headers, encoding)",
            registry=self.registry,
        )

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method, code).observe(seconds)

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        """One provider HTTP request: counted by status, timed by status class ("2xx")."""
        self.http_requests.labels(route, str(status)).inc()
        self.http_latency.labels(route, f"{status // 100}xx").observe(seconds)
