"""Per-key rate limits: the rule that turns a tower's `metadata.rate_limit` into a limit, and
GCRA limiters kept in process memory or shared by every replica through Redis.

The rule (`effective_limit`), in requests per minute:

- A finite positive int or float, or a string holding one (`"30"`, `" 2.5 "`), is the key's
  limit, clamped to [MIN_PER_MINUTE, MAX_PER_MINUTE].
- Anything else falls back to the default: missing or null, zero, negative, NaN, infinity,
  booleans, non-numeric strings, lists, mappings. A tower that sends garbage never makes a key
  unlimited and never breaks a request.
- `rate_limit.default_per_minute: 0` means "no default": keys without a usable limit of
  their own are not limited (None); keys whose tower metadata sets one still are.

The algorithm is GCRA (generic cell rate algorithm), which behaves like a token bucket that holds
`burst` requests and refills one request every `60 / limit` seconds, without a background timer
and with a single timestamp (the "theoretical arrival time") stored per key. The default burst is
the per-minute limit itself (at least 1), so a fresh key may spend its whole minute at once and
then proceeds at the steady rate; `rate_limit.burst` sets one burst for every key instead.

With the Redis backend, a Redis that is down or slow never fails a request: the decision is made
by a local in-memory limiter (each replica then enforces the limit on its own), `on_fallback` is
called for every such decision, and Redis is tried again after a short back-off. In "exact"
mode (`ratelimit_exact.RedisRateLimiter`) every decision is Redis's, the decisions of one
event-loop tick in one round trip; in "batched" mode (`ratelimit_batched`) each process decides
on its share of the bucket and settles with Redis every `rate_limit.sync_interval`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

log = logging.getLogger(__name__)

MAX_PER_MINUTE: Final = 1_000_000.0
# One request per 100 minutes: a tiny positive value is read as "very strict", not as garbage.
MIN_PER_MINUTE: Final = 0.01
MAX_BURST: Final = 1_000_000
_MAX_NUMERIC_STRING: Final = 32
_US_PER_S: Final = 1_000_000
# After a Redis failure, requests skip Redis for this long so a dead Redis does not cost every
# request a full timeout.
DEFAULT_RETRY_INTERVAL: Final = 1.0


@dataclass(frozen=True, slots=True)
class Decision:
    """One limiter answer. `limit` is the burst (requests that may be sent at once); times are
    seconds: `reset_after` until the bucket is full again, `retry_after` until the next request
    would be allowed (0 when this one was)."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float

    def headers(self) -> dict[str, str]:
        """`RateLimit-*` response headers, plus `Retry-After` on a refusal."""
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(max(0, self.remaining)),
            "RateLimit-Reset": str(max(0, math.ceil(self.reset_after))),
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return out


def effective_limit(raw: object, default_per_minute: float) -> float | None:
    """The per-minute limit for a key whose tower metadata says `raw`; None means unlimited."""
    value = _parse_limit(raw)
    if value is None:
        if not default_per_minute > 0:
            return None
        value = default_per_minute
    return min(max(value, MIN_PER_MINUTE), MAX_PER_MINUTE)


def _parse_limit(raw: object) -> float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        # Capped while still an int: float() of a huge int raises OverflowError.
        return float(min(raw, int(MAX_PER_MINUTE))) if raw > 0 else None
    if isinstance(raw, float):
        value = raw
    elif isinstance(raw, str) and len(raw) <= _MAX_NUMERIC_STRING:
        try:
            value = float(raw)
        except ValueError:
            return None
    else:
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return value


def _plan(per_minute: float, burst: int | None) -> tuple[float, int]:
    """Emission interval (seconds per request) and burst for a per-minute limit."""
    if not (math.isfinite(per_minute) and per_minute > 0):
        raise ValueError("per_minute must be a finite positive number (see effective_limit)")
    per_minute = min(max(per_minute, MIN_PER_MINUTE), MAX_PER_MINUTE)
    size = burst if burst is not None else math.floor(per_minute)
    return 60.0 / per_minute, min(max(1, size), MAX_BURST)


def _gcra(tat: float, now: float, interval: float, burst: int) -> tuple[float | None, Decision]:
    """One GCRA step. Returns the new arrival time to store (None on a refusal) and the decision.

    A bucket whose stored time `tat` lies in the past is full. A request moves `tat` one
    interval forward, and is allowed while that stays within `burst` intervals of now.
    """
    tat = max(tat, now)
    new_tat = tat + interval
    # Computed from `tat`, not as `new_tat - interval * burst`: for a full bucket
    # (`tat == now`, burst 1) the latter can round to a hair above `now` and
    # refuse a fresh key's first request.
    allow_at = tat - interval * (burst - 1)
    if now < allow_at:
        return None, Decision(False, burst, 0, tat - now, allow_at - now)
    # The small epsilon keeps float rounding from reporting one request fewer than is left.
    remaining = math.floor((now - allow_at) / interval + 1e-9)
    return new_tat, Decision(True, burst, min(remaining, burst - 1), new_tat - now, 0.0)


class RateLimiter(Protocol):
    async def hit(self, bucket: str, per_minute: float) -> Decision:
        """Count one request against `bucket` (a key fingerprint) and say whether it may pass."""
        ...

    async def peek(self, bucket: str, per_minute: float) -> Decision:
        """What `hit` would answer now, counting nothing (explain's dry run)."""
        ...

    async def close(self) -> None: ...


class MemoryRateLimiter:
    """GCRA in this process. Keeps at most `max_buckets` keys, dropping the least recently used
    first; a bucket that has refilled equals a fresh one, so it is dropped as soon as it is seen
    at the old end."""

    def __init__(
        self,
        *,
        burst: int | None = None,
        max_buckets: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_buckets < 1:
            raise ValueError("max_buckets must be positive")
        self._burst = burst
        self._max_buckets = max_buckets
        self._clock = clock
        self._tats: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tats)

    def decide(self, bucket: str, per_minute: float) -> Decision:
        """The synchronous core of `hit`; it never awaits, so asyncio needs no lock around it."""
        interval, burst = _plan(per_minute, self._burst)
        return decide_in(self._tats, bucket, self._clock(), interval, burst, self._max_buckets)

    def peek_now(self, bucket: str, per_minute: float) -> Decision:
        interval, burst = _plan(per_minute, self._burst)
        now = self._clock()
        return _gcra(self._tats.get(bucket, now), now, interval, burst)[1]

    async def peek(self, bucket: str, per_minute: float) -> Decision:
        return self.peek_now(bucket, per_minute)

    def refund(self, bucket: str, per_minute: float) -> None:
        """Gives back one request that `decide` allowed (it turned out not to count)."""
        tat = self._tats.get(bucket)
        if tat is None:
            return
        interval, _ = _plan(per_minute, self._burst)
        tat -= interval
        if tat > self._clock():
            self._tats[bucket] = tat
        else:
            del self._tats[bucket]  # full again: the same as no bucket at all

    async def hit(self, bucket: str, per_minute: float) -> Decision:
        return self.decide(bucket, per_minute)

    async def close(self) -> None:
        self._tats.clear()


def decide_in(
    tats: OrderedDict[str, float],
    bucket: str,
    now: float,
    interval: float,
    burst: int,
    max_buckets: int,
) -> Decision:
    """One GCRA step on a bucket of an LRU map of arrival times (a missing bucket is full)."""
    tat = tats.pop(bucket, now)
    new_tat, decision = _gcra(tat, now, interval, burst)
    stored = new_tat if new_tat is not None else tat
    if stored > now:
        tats[bucket] = stored
    evict_refilled(tats, now, max_buckets)
    return decision


def evict_refilled(tats: OrderedDict[str, float], now: float, max_buckets: int) -> None:
    """Drops buckets of an LRU map of arrival times that have refilled, and the least recently
    used beyond `max_buckets`."""
    # The oldest entries are the likeliest to have refilled; dropping those loses nothing.
    # Checking at most two per call keeps each decision O(1).
    for _ in range(2):
        if not tats:
            return
        bucket, tat = next(iter(tats.items()))
        if tat > now:
            break
        del tats[bucket]
    while len(tats) > max_buckets:
        tats.popitem(last=False)


def call_hook(hook: Callable[[], None] | None) -> None:
    """Calls a metrics hook; a broken one must not turn into a failed request."""
    if hook is None:
        return
    try:
        hook()
    except Exception:
        log.exception("rate limiter hook failed")
