"""The Redis connection pool of every process (`connection.redis_client`): bounded, its callers
wait a bounded time for a connection, and its exhaustion is told apart from an outage.

redis-py's asyncio pool refuses at once (`MaxConnectionsError`) when its connections are all
busy, so load above the pool size looked like a Redis outage: rate limits and the shared cache
fell back to per-process behaviour. Here a call waits up to `redis.pool_timeout` for a
connection, and raises `PoolExhausted` (a `ConnectionError`) if none frees up, which callers
count as a Redis error without pausing their use of Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import redis.asyncio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import ConnectionError as RedisConnectionError

DEFAULT_MAX_CONNECTIONS: Final = 100
DEFAULT_POOL_TIMEOUT: Final = 0.5


class PoolExhausted(RedisConnectionError):
    """Every pooled connection stayed busy for `redis.pool_timeout`: Redis is slow or the pool
    too small for the load, not unreachable."""


class WaitingPool(redis.asyncio.BlockingConnectionPool):
    """A pool whose callers wait a bounded time for a connection (redis-py's default pool
    refuses at once, which turned load above the pool size into fallbacks), and whose
    exhaustion is told apart from a Redis that does not answer. Counts the calls that had to
    wait (`waits`, `wait_seconds`) and those that waited in vain (`exhausted`)."""

    waits = 0
    wait_seconds = 0.0
    exhausted = 0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        waited = not self.can_get_connection()
        started = time.monotonic() if waited else 0.0
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisConnectionError as exc:
            if isinstance(exc.__cause__, asyncio.TimeoutError) and not isinstance(
                exc, PoolExhausted
            ):
                self.exhausted += 1
                raise PoolExhausted(f"no Redis connection free within {self.timeout} s") from exc
            raise
        finally:
            if waited:
                self.waits += 1
                self.wait_seconds += time.monotonic() - started

    def in_use(self) -> int:
        return len(self._in_use_connections)


class PoolCollector(Collector):
    """`tower_gateway_redis_pool_*`: the connections in use and the pool's size, the calls that
    waited for a connection and for how long. Reads the pool of whatever client `current`
    returns at scrape time (none before the gateway starts)."""

    def __init__(self, current: Callable[[], redis.asyncio.Redis | None]) -> None:
        self._current = current

    def collect(self) -> Iterator[Metric]:
        client = self._current()
        pool = client.connection_pool if client is not None else None
        if not isinstance(pool, WaitingPool):
            return
        size = GaugeMetricFamily(
            "tower_gateway_redis_pool_connections",
            "Redis connections of this process: in use, and the most it may open",
            labels=["state"],
        )
        size.add_metric(["in_use"], pool.in_use())
        size.add_metric(["max"], pool.max_connections)
        yield size
        yield CounterMetricFamily(
            "tower_gateway_redis_pool_waits",
            "Redis calls that found every pooled connection busy and waited for one",
            value=pool.waits,
        )
        yield CounterMetricFamily(
            "tower_gateway_redis_pool_wait_seconds",
            "Time Redis calls spent waiting for a pooled connection",
            value=pool.wait_seconds,
        )


def pool_wait(client: redis.asyncio.Redis) -> float:
    """How long a call on `client` may wait for a pooled connection (0 for another pool): a
    call's own timeout must leave it that much more, so an exhausted pool is reported as such
    before the call times out."""
    wait = getattr(client.connection_pool, "timeout", None)
    return float(wait) if isinstance(wait, int | float) else 0.0
