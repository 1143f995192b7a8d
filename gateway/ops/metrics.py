"""Prometheus metrics, registered on a registry the caller owns.

What the hot path touches on every request (requests by route and status, auth
outcomes, upstream latency, requests in flight, cache hits, JWT reuse) is kept
in plain integers and read by collectors at scrape time: the event loop is the
only writer, so a request takes no Prometheus lock. Labels are bounded: route
names, outcome and reason ids, status codes; never a key, a user or a path.
"""

from __future__ import annotations

import bisect
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway import __version__
from gateway.auth.identity import CacheStats

PREFIX: Final = "tower_gateway_"
# Gauge values of `tower_circuit_state`, ordered by severity so max() over replicas is useful.
CIRCUIT_STATES: Final = {"closed": 0, "half_open": 1, "open": 2}
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class _StatsCollector(Collector):
    """Exports counters owned by the cache and the token minter at scrape time."""

    def __init__(self, read: Callable[[], tuple[CacheStats, int, int, int, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        stats, positive, negative, minted, reused = self._read()
        counters = (
            (
                "cache_hits",
                "Identity lookups answered from the cache (stale ones served at once included)",
                stats.hits,
            ),
            ("cache_misses", "Identity lookups that needed the tower", stats.misses),
            ("cache_negative_hits", "Lookups answered by a cached refusal", stats.negative_hits),
            (
                "cache_stale_serves",
                "Expired identities served while refreshed, or while the tower failed",
                stats.stale_serves,
            ),
            (
                "cache_refreshes",
                "Background refreshes of cached identities (ahead of expiry, or stale)",
                stats.refreshes,
            ),
            (
                "cache_tower_waits",
                "Identity lookups whose request waited for a tower call",
                stats.tower_waits,
            ),
            ("cache_evictions", "Identities pushed out by the size bound", stats.evictions),
            ("single_flight_waiters", "Lookups that waited on another's tower call", stats.waiters),
            (
                "cache_shared_hits",
                "Identities copied from the cache replicas share in Redis",
                stats.shared_hits,
            ),
        )
        for name, doc, value in counters:
            family = CounterMetricFamily(PREFIX + name, doc)
            family.add_metric([], value)
            yield family
        jwt = CounterMetricFamily(
            PREFIX + "jwt_tokens", "Internal JWTs by origin", labels=["origin"]
        )
        jwt.add_metric(["minted"], minted)
        jwt.add_metric(["reused"], reused)
        yield jwt
        ratio = GaugeMetricFamily(PREFIX + "cache_hit_ratio", "hits / (hits + misses) since start")
        ratio.add_metric([], stats.hit_ratio)
        yield ratio
        entries = GaugeMetricFamily(
            PREFIX + "cache_entries", "Cached identities by kind", labels=["kind"]
        )
        entries.add_metric(["positive"], positive)
        entries.add_metric(["negative"], negative)
        yield entries


class _DroppedLinesCollector(Collector):
    """Log lines dropped by a full or failing sink, per log, read from the writers."""

    def __init__(self, read: Callable[[], Mapping[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            PREFIX + "log_lines_dropped",
            "Log lines dropped because the sink was full or failing, by log",
            labels=["log"],
        )
        for name, value in self._read().items():
            family.add_metric([name], value)
        yield family


# The `le` label of each bucket, +Inf last, spelled as prometheus_client spells it.
_LE: Final = tuple(
    floatToGoString(bound)  # type: ignore[no-untyped-call]
    for bound in (*LATENCY_BUCKETS, float("inf"))
)


class _LatencyHistogram:
    """One histogram series kept as bucket counts; exported cumulatively at scrape time."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(_LE)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for le, count in zip(_LE, self.counts, strict=True):
            total += count
            out.append((le, total))
        return out


class _RequestCollector(Collector):
    """Exports the per-request counters `Metrics` keeps in plain integers."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            PREFIX + "requests", "Requests by route and status", labels=["route", "status"]
        )
        for (route, status), value in list(m.request_counts.items()):
            requests.add_metric([route, str(status)], value)
        yield requests
        auth = CounterMetricFamily(
            PREFIX + "auth", "Authentication decisions by outcome (reason id)", labels=["outcome"]
        )
        for outcome, value in list(m.auth_counts.items()):
            auth.add_metric([outcome], value)
        yield auth
        upstream = HistogramMetricFamily(
            PREFIX + "upstream_response_seconds",
            "Time from forwarding to the upstream's response head, by route",
            labels=["route"],
        )
        for route, histogram in list(m.upstream_latency.items()):
            upstream.add_metric([route], histogram.buckets(), histogram.sum)
        yield upstream
        in_flight = GaugeMetricFamily(PREFIX + "requests_in_flight", "Requests being handled")
        in_flight.add_metric([], m.in_flight)
        yield in_flight


class Metrics:
    """Every metric of the gateway. Tests pass a fresh `CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # `_created` series double every counter's output and no dashboard uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        self.tower_requests = Counter(
            PREFIX + "tower_requests",
            "Calls to the tower by outcome",
            ["outcome"],
            registry=registry,
        )
        self.tower_seconds = Histogram(
            PREFIX + "tower_request_seconds",
            "Tower call latency by outcome",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rate_limited = Counter(
            PREFIX + "rate_limited", "Requests refused by a rate limit", registry=registry
        )
        self.rate_limit_fallbacks = Counter(
            PREFIX + "rate_limit_fallbacks",
            "Rate-limit decisions made locally because Redis was unavailable",
            registry=registry,
        )
        self.quota_fallbacks = Counter(
            PREFIX + "quota_fallbacks",
            "Quota decisions counted locally because Redis was unavailable",
            registry=registry,
        )
        self.malformed_constraints = Counter(
            PREFIX + "malformed_key_constraints",
            "Tower answers whose key restrictions were malformed (the key refused)",
            registry=registry,
        )
        self.usage_reports = Counter(
            PREFIX + "usage_reports",
            "Usage reports sent to the tower, by result (ok, failed: retried with the next)",
            ["result"],
            registry=registry,
        )
        self.usage_dropped = Gauge(
            PREFIX + "usage_dropped",
            "Key uses not reported because tower.usage_report.max_keys keys were waiting",
            registry=registry,
        )
        self.redis_errors = Counter(
            PREFIX + "redis_errors",
            "Redis errors and timeouts by operation; each was answered as if without Redis",
            ["op"],
            registry=registry,
        )
        self.websocket_connections = Gauge(
            PREFIX + "websocket_connections",
            "Open relayed WebSocket connections",
            registry=registry,
        )
        self.tower_circuit_state = Gauge(
            PREFIX + "tower_circuit_state",
            "Tower circuit breaker: 0 closed, 1 half-open, 2 open",
            registry=registry,
        )
        self.would_deny = Counter(
            PREFIX + "would_deny",
            "Denials not enforced (shadow mode), by route and reason",
            ["route", "outcome"],
            registry=registry,
        )
        self.config_reloads = Counter(
            PREFIX + "config_reloads",
            "Config reloads (SIGHUP, POST /admin/reload) by outcome: success, failure",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("success", "failure"):
            self.config_reloads.labels(outcome)  # both series exist from the start, at 0
        self.config_last_success = Gauge(
            PREFIX + "config_last_reload_success_timestamp_seconds",
            "When the config in effect was loaded (start or last successful reload)",
            registry=registry,
        )
        self.config_last_success.set(time.time())
        self.config_last_ok = Gauge(
            PREFIX + "config_last_reload_successful",
            "1 when the last reload succeeded or none was tried, 0 when it failed",
            registry=registry,
        )
        self.config_last_ok.set(1)
        self.config_restart_pending = Gauge(
            PREFIX + "config_restart_pending",
            "Settings changed in the file that only a restart applies",
            registry=registry,
        )
        self.build = Info(PREFIX + "build", "Build information", registry=registry)
        self.build.info({"version": __version__, "python": platform.python_version()})
        # Written by the request path, read by `_RequestCollector`.
        self.in_flight = 0
        self.request_counts: dict[tuple[str, int], int] = {}
        self.auth_counts: dict[str, int] = {}
        self.upstream_latency: dict[str, _LatencyHistogram] = {}
        registry.register(_RequestCollector(self))

    def watch(self, read: Callable[[], tuple[CacheStats, int, int, int, int]]) -> None:
        self.registry.register(_StatsCollector(read))

    def watch_logs(self, read: Callable[[], Mapping[str, int]]) -> None:
        self.registry.register(_DroppedLinesCollector(read))

    def tower_call(self, outcome: str, seconds: float) -> None:
        self.tower_requests.labels(outcome).inc()
        self.tower_seconds.labels(outcome).observe(seconds)

    def circuit_state(self, state: str) -> None:
        self.tower_circuit_state.set(CIRCUIT_STATES[state])

    def count_request(self, route: str, status: int) -> None:
        counts, key = self.request_counts, (route, status)
        counts[key] = counts.get(key, 0) + 1

    def observe_upstream(self, route: str, seconds: float) -> None:
        histogram = self.upstream_latency.get(route)
        if histogram is None:
            histogram = self.upstream_latency[route] = _LatencyHistogram()
        histogram.observe(seconds)

    def count_auth(self, outcome: str) -> None:
        counts = self.auth_counts
        counts[outcome] = counts.get(outcome, 0) + 1
