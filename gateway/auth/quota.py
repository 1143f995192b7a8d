"""Quotas: at most N requests per calendar day or month (UTC), per key, user or team.

A quota is counted per period: the counter's name holds the period's start (`2026-12-07`,
`2026-12`), so a new period starts from zero without a reset, and the counter expires at the
period's end. In memory, per process; on Redis, one atomic `INCR` (with its expiry, in one Lua
script) per request, shared by every replica and worker and kept across restarts.

The clock is the gateway's wall clock (injected for tests), so the day boundary is the gateway's
idea of UTC midnight. A Redis that is down or slow never fails a request: the same fallback rule
as the rate limits (a local counter decides, `on_fallback` is called, Redis is retried after a
short back-off).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

import redis.asyncio

from gateway.auth.ratelimit import DEFAULT_RETRY_INTERVAL, call_hook
from gateway.tower.constraints import Quota

log = logging.getLogger(__name__)


# Not `frozen`: built per request, and a frozen dataclass's __init__ pays an
# object.__setattr__ per field. Never changed once built.
@dataclass(slots=True)
class QuotaDecision:
    """One quota answer: `used` counts this request (when it was counted)."""

    allowed: bool
    limit: int
    remaining: int
    period: str
    reset_after: float  # seconds to the period's end

    def headers(self) -> dict[str, str]:
        """`Quota-*` response headers (like `RateLimit-*`), plus `Retry-After` on a refusal."""
        reset = str(max(1, math.ceil(self.reset_after)))
        out = {
            "Quota-Limit": str(self.limit),
            "Quota-Remaining": str(max(0, self.remaining)),
            "Quota-Reset": reset,
            "Quota-Period": self.period,
        }
        if not self.allowed:
            out["Retry-After"] = reset
        return out


def period_window(period: str, now: float) -> tuple[str, float]:
    """The period's label and its end (epoch seconds), in UTC."""
    start, end, label = _windows.get(period, _NO_WINDOW)
    if start <= now < end:  # the common case: the period of the previous request
        return label, end
    day = datetime.fromtimestamp(now, UTC)
    if period == "day":
        first = day.replace(hour=0, minute=0, second=0, microsecond=0)
        following = first + timedelta(days=1)
        label = first.strftime("%Y-%m-%d")
    else:
        first = day.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = (first + timedelta(days=32)).replace(day=1)
        label = first.strftime("%Y-%m")
    _windows[period] = (first.timestamp(), following.timestamp(), label)
    return label, following.timestamp()


# The last window computed per period: datetime arithmetic once per period, not per request.
_NO_WINDOW: Final = (math.inf, -math.inf, "")
_windows: dict[str, tuple[float, float, str]] = {}


def _decision(quota: Quota, used: int, end: float, now: float) -> QuotaDecision:
    return QuotaDecision(
        used <= quota.limit, quota.limit, quota.limit - used, quota.period, end - now
    )


class QuotaCounter(Protocol):
    async def hit(self, bucket: str, quota: Quota) -> QuotaDecision:
        """Count one request against `bucket` and say whether it is within the quota."""
        ...

    async def peek(self, bucket: str, quota: Quota) -> QuotaDecision:
        """What the next request would get, counting nothing (explain's dry run)."""
        ...


class MemoryQuota:
    """Per-process counters; keeps at most `max_buckets`, dropping the least recently used.
    A counter of a past period is read as zero (and replaced)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.time, max_buckets: int = 100_000
    ) -> None:
        self._clock = clock
        self._max_buckets = max_buckets
        self._counts: dict[str, tuple[str, int]] = {}  # bucket -> (period label, used)

    def count(self, bucket: str, quota: Quota, *, add: int = 1) -> QuotaDecision:
        """Counts `add` requests (0: only looks) and answers for the last one counted (or, when
        only looking, for the next one)."""
        now = self._clock()
        label, end = period_window(quota.period, now)
        counts = self._counts
        entry = counts.pop(bucket, None)  # re-inserted below: the most recently used
        used = entry[1] + add if entry is not None and entry[0] == label else add
        counts[bucket] = (label, used)
        if len(counts) > self._max_buckets:
            del counts[next(iter(counts))]
        return _decision(quota, used + (1 - add), end, now)

    async def hit(self, bucket: str, quota: Quota) -> QuotaDecision:
        return self.count(bucket, quota)

    async def peek(self, bucket: str, quota: Quota) -> QuotaDecision:
        return self.count(bucket, quota, add=0)


# KEYS[1]: the period's counter; ARGV[1]: its end (epoch seconds); ARGV[2] given: read only.
_QUOTA_LUA: Final = """
if ARGV[2] then return tonumber(redis.call('GET', KEYS[1]) or '0') end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIREAT', KEYS[1], ARGV[1]) end
return n
"""


class RedisQuota:
    """Counters shared by every replica: one atomic script per request."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str,
        fallback: MemoryQuota,
        on_fallback: Callable[[], None] | None = None,
        timeout: float = 0.25,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prefix = prefix + "quota:"
        self._fallback = fallback
        self._on_fallback = on_fallback
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._clock = clock
        self._monotonic = monotonic
        self._script = client.register_script(_QUOTA_LUA)
        self._skip_until = -math.inf
        self._degraded = False

    async def hit(self, bucket: str, quota: Quota) -> QuotaDecision:
        return await self._count(bucket, quota, peek=False)

    async def peek(self, bucket: str, quota: Quota) -> QuotaDecision:
        return await self._count(bucket, quota, peek=True)

    async def _count(self, bucket: str, quota: Quota, *, peek: bool) -> QuotaDecision:
        now = self._clock()
        label, end = period_window(quota.period, now)
        if self._monotonic() >= self._skip_until:
            key = f"{self._prefix}{bucket}:{quota.period}:{label}"
            args = [math.ceil(end), 1] if peek else [math.ceil(end)]
            try:
                async with asyncio.timeout(self._timeout):
                    used = int(await self._script(keys=[key], args=args))
            except Exception as exc:  # any failure means "count locally", never a 500
                self._skip_until = self._monotonic() + self._retry_interval
                if not self._degraded:
                    self._degraded = True
                    log.warning(
                        "redis quota unavailable (%s), counting per process", type(exc).__name__
                    )
            else:
                if self._degraded:
                    self._degraded = False
                    log.info("redis quota available again")
                return _decision(quota, used + 1 if peek else used, end, now)
        if peek:
            return self._fallback.count(bucket, quota, add=0)
        call_hook(self._on_fallback)
        return self._fallback.count(bucket, quota)


def quota_counter(
    client: redis.asyncio.Redis | None,
    *,
    prefix: str,
    clock: Callable[[], float] = time.time,
    on_fallback: Callable[[], None] | None = None,
    timeout: float = 0.25,
) -> QuotaCounter:
    """On Redis when the gateway shares its rate limits there, else in this process."""
    local = MemoryQuota(clock=clock)
    if client is None:
        return local
    return RedisQuota(
        client,
        prefix=prefix,
        fallback=local,
        on_fallback=on_fallback,
        clock=clock,
        timeout=timeout,
    )
