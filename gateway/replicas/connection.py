"""Redis for replicas: the client, the fault handling every operation goes through (a
Redis that fails never fails a request), and the signing of what replicas write."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Final

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.config import CacheConfig
from gateway.replicas.pool import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_POOL_TIMEOUT,
    PoolExhausted,
    WaitingPool,
    pool_wait,
)

log = logging.getLogger("tower_gateway.shared")


# A dead Redis must cost a request little: short socket timeouts, and each call on the
# request path bounded again by OP_TIMEOUT.
SOCKET_TIMEOUT: Final = 0.5


OP_TIMEOUT: Final = 0.25


# Revocations touch up to a thousand keys in one pipeline; they are rare and worth a wait.
ADMIN_OP_TIMEOUT: Final = 2.0


# After a failure the request path skips Redis this long, so an outage does not cost every
# request a timeout. A successful re-subscription ends the pause at once.
RETRY_INTERVAL: Final = 1.0


LOG_INTERVAL: Final = 30.0


# Waiters for a lock are woken by the holder's "filled" message; they look again after this
# long without one (a message lost with a reconnection, a holder that died).
POLL_INTERVAL: Final = 0.1


LISTEN_TIMEOUT: Final = 1.0


PING_INTERVAL: Final = 10.0


BACKOFF_START: Final = 0.1


BACKOFF_MAX: Final = 2.0


SCAN_COUNT: Final = 500


REDIS_FAULTS: Final = (RedisError, OSError, TimeoutError)


_GLOB_SPECIAL: Final = re.compile(r"([*?\[\]\\])")


# Revocation markers outlive every entry fetched before them by this much more (clock skew
# between replicas, which judge an entry's stale_until by their own clocks).
MARKER_MARGIN: Final = 60.0


# Revocations a replica remembers (key_ids), oldest forgotten first beyond this.
MAX_REMEMBERED: Final = 100_000


# A revocation message older than this (by its sender's clock), or seen before, is ignored.
MESSAGE_MAX_AGE: Final = 300.0


def marker_ttl(config: CacheConfig, lock_ttl: float) -> float:
    """How long a revocation must be remembered: longer than any entry fetched before it can
    live (one tower call, then ttl and stale_if_error), plus a margin for clock skew."""
    return lock_ttl + config.ttl + config.stale_if_error + MARKER_MARGIN


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).hexdigest().encode()


class Revocations:
    """The revocations this replica heard (its own and other replicas'), by Redis's clock: an
    entry fetched at or before one is never read, whatever Redis holds (its marker deleted by
    someone who can write to Redis, an old signed entry written back)."""

    def __init__(self, keep: float, max_entries: int = MAX_REMEMBERED) -> None:
        self._keep_ms = math.ceil(keep * 1000)
        self._max = max_entries
        self._at: dict[str, int] = {}
        self._all = -1
        self._newest = 0

    def note(self, key_ids: Sequence[str] | None, at_ms: int) -> None:
        self._newest = max(self._newest, at_ms)
        if key_ids is None:
            self._all = max(self._all, at_ms)
        else:
            for key_id in key_ids:
                self._at[key_id] = max(self._at.pop(key_id, -1), at_ms)
        horizon = self._newest - self._keep_ms
        while self._at and (len(self._at) > self._max or next(iter(self._at.values())) < horizon):
            del self._at[next(iter(self._at))]

    def revoked(self, key_id: str | None, fetched_ms: int) -> bool:
        if self._all >= fetched_ms:
            return True
        return key_id is not None and self._at.get(key_id, -1) >= fetched_ms


def redis_client(
    url: str,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    pool_timeout: float = DEFAULT_POOL_TIMEOUT,
) -> redis.asyncio.Redis:
    """The one client a Gateway uses for everything shared (rate limits, cache, revocations):
    at most `max_connections` connections, a call waiting up to `pool_timeout` for one."""
    pool = WaitingPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        # A pooled connection that died with a Redis restart reconnects at once.
        retry=Retry(NoBackoff(), 1),
    )
    return redis.asyncio.Redis.from_pool(pool)


def op_timeout(client: redis.asyncio.Redis) -> float:
    """OP_TIMEOUT for the call itself, plus the time it may wait for a pooled connection."""
    return OP_TIMEOUT + pool_wait(client)


class RedisFaults:
    """Counts Redis failures, logs them sparingly, and pauses the request path after one."""

    def __init__(
        self,
        on_error: Callable[[str], None] | None = None,
        *,
        retry_interval: float = RETRY_INTERVAL,
        log_interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_error = on_error
        self._retry_interval = retry_interval
        self._log_interval = log_interval
        self._clock = clock
        self._skip_until = -math.inf
        self._logged_at = -math.inf
        self._suppressed = 0
        self.errors = 0

    def record(self, op: str, exc: BaseException, *, pause: bool = True) -> None:
        if isinstance(exc, PoolExhausted):
            # Redis answers, the pool is too small for the load: counted, never a pause.
            op, pause = "pool", False
        self.errors += 1
        now = self._clock()
        if pause:
            self._skip_until = now + self._retry_interval
        if self._on_error is not None:
            try:
                self._on_error(op)
            except Exception:  # a broken metrics hook must not turn into a failed request
                log.exception("redis error hook failed")
        if now - self._logged_at >= self._log_interval:
            more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            log.warning(
                "redis %s failed (%s), continuing without it%s", op, type(exc).__name__, more
            )
            self._logged_at, self._suppressed = now, 0
        else:
            self._suppressed += 1

    def skipping(self) -> bool:
        """True while the request path should not even try Redis."""
        return self._clock() < self._skip_until

    def recovered(self) -> None:
        self._skip_until = -math.inf
