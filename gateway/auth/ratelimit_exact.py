"""Rate limits shared through Redis, decided there ("exact" mode, `rate_limit.mode: exact`):
one atomic GCRA script decides, the decisions of one event-loop tick in one round trip.

A Redis that is down or slow never fails a request: the decision is made by a local in-memory
limiter (each replica then enforces the limit on its own), `on_fallback` is called for every
such decision, and Redis is tried again after a short back-off. An exhausted connection pool
(`PoolExhausted`) makes only the decisions that waited for it local.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import redis.asyncio

from gateway.auth.ratelimit import (
    _US_PER_S,
    DEFAULT_RETRY_INTERVAL,
    Decision,
    MemoryRateLimiter,
    _plan,
    call_hook,
)
from gateway.replicas.pool import PoolExhausted

log = logging.getLogger(__name__)


# KEYS: the buckets; ARGV: per bucket, emission interval in microseconds, burst, and 1 to only
# say what a request would get and count nothing (explain), else 0.
# Returns four integers per bucket: allowed, remaining, reset and retry (microseconds). The
# decisions one process makes in the same event-loop tick travel together; the buckets are
# decided one after the other, so two requests on one bucket see each other.
# Times are whole microseconds so every value is an exact integer in Lua's doubles, and Redis
# (which truncates Lua numbers in replies) returns them unchanged.
_GCRA_LUA: Final = """
-- Before Redis 5 a script that reads TIME must ask for effect replication to write afterwards.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local peek = ARGV[3 * i] == '1'
  local tat = tonumber(redis.call('GET', key) or now) or now
  if tat < now then tat = now end
  -- No request leaves a bucket emptier than burst intervals from now: a later time was written
  -- by someone else (with no expiry, it would block the key for ever). Read as empty, and
  -- written back with an expiry.
  if tat > now + interval * burst then
    tat = now + interval * burst
    redis.call('SET', key, string.format('%.0f', tat), 'PX',
               math.max(1, math.ceil((tat - now) / 1000)))
  end
  local new_tat = tat + interval
  local allow_at = new_tat - interval * burst
  if now < allow_at then
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = tat - now
    out[#out + 1] = allow_at - now
  else
    if not peek then
      -- The key lives exactly until the bucket is full again, when it would equal a missing key.
      redis.call('SET', key, string.format('%.0f', new_tat), 'PX',
                 math.max(1, math.ceil((new_tat - now) / 1000)))
    end
    out[#out + 1] = 1
    out[#out + 1] = math.floor((now - allow_at) / interval)
    out[#out + 1] = new_tat - now
    out[#out + 1] = 0
  end
end
return out
"""

# Decisions sent in one script call at most, and calls in flight at once per limiter: under
# load, decisions queue behind the calls in flight and leave together in the next one, so a
# process needs a few connections for its limits however many requests it serves.
MAX_BATCH: Final = 256
MAX_IN_FLIGHT: Final = 2


@dataclass(slots=True)
class _Pending:
    key: str
    interval_us: int
    burst: int
    peek: bool
    answer: asyncio.Future[Decision]


class RedisRateLimiter:
    """GCRA shared by every replica: an atomic Lua script on Redis decides ("exact" mode).

    The script reads the clock with Redis `TIME`, not the caller's clock, so replicas whose
    clocks disagree still share one timeline per bucket. The decisions asked for while a call
    is on its way are coalesced into the next call (one round trip for many requests). The
    client belongs to the caller and should have short socket timeouts; `close()` leaves it
    open. Failures are reported to `on_error` (the metric `redis_errors_total{op}`): a Redis
    that fails to answer makes this and the next `retry_interval` seconds of decisions local
    (`on_fallback` for each); an exhausted connection pool (`op="pool"`) only the decisions
    that waited for it.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str,
        burst: int | None = None,
        fallback: MemoryRateLimiter,
        on_fallback: Callable[[], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        timeout: float = 0.25,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._client = client
        self._prefix = prefix + "rl:"
        self._burst = burst
        self._fallback = fallback
        self._on_fallback = on_fallback
        self._on_error = on_error
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._clock = clock
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._script = client.register_script(_GCRA_LUA)
        self._skip_until = -math.inf
        self._degraded = False
        self._queue: list[_Pending] = []
        self._scheduled = False
        self._calls: set[asyncio.Task[None]] = set()
        self.round_trips = 0

    @property
    def degraded(self) -> bool:
        """True while decisions come from the local fallback."""
        return self._degraded

    async def hit(self, bucket: str, per_minute: float) -> Decision:
        interval, burst = _plan(per_minute, self._burst)
        if self._clock() >= self._skip_until:
            try:
                decision = await self._ask(bucket, interval, burst)
            except Exception as exc:  # any failure means "ask the local limiter", never a 500
                self._failed(exc)
            else:
                if self._degraded:
                    self._degraded = False
                    log.info("redis rate limiter available again")
                return decision
        call_hook(self._on_fallback)
        log.debug("rate limit decided locally for bucket %s", bucket)
        return self._fallback.decide(bucket, per_minute)

    async def peek(self, bucket: str, per_minute: float) -> Decision:
        interval, burst = _plan(per_minute, self._burst)
        if self._clock() >= self._skip_until:
            try:
                return await self._ask(bucket, interval, burst, peek=True)
            except Exception:  # reported by the next `hit`; a peek changes nothing
                log.debug("rate limit peeked locally for bucket %s", bucket)
        return self._fallback.peek_now(bucket, per_minute)

    async def close(self) -> None:
        for call in list(self._calls):
            call.cancel()
        await self._fallback.close()

    def _failed(self, exc: Exception) -> None:
        pool = isinstance(exc, PoolExhausted)
        on_error, op = self._on_error, "pool" if pool else "rate_limit"
        if on_error is not None:
            call_hook(lambda: on_error(op))
        if pool:
            return  # Redis answers: the next decision asks it again
        self._skip_until = self._clock() + self._retry_interval
        if not self._degraded:
            self._degraded = True
            log.warning(
                "redis rate limiter unavailable (%s), using per-process limits",
                type(exc).__name__,
            )

    async def _ask(
        self, bucket: str, interval: float, burst: int, *, peek: bool = False
    ) -> Decision:
        answer: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        interval_us = max(1, round(interval * _US_PER_S))
        self._queue.append(_Pending(self._prefix + bucket, interval_us, burst, peek, answer))
        if not self._scheduled:
            # At the end of this tick: every decision asked for until then joins the call.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_queued)
        return await answer

    def _send_queued(self) -> None:
        self._scheduled = False
        while self._queue and len(self._calls) < self._max_in_flight:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            call = asyncio.get_running_loop().create_task(self._call(batch))
            self._calls.add(call)
            call.add_done_callback(self._call_done)

    def _call_done(self, call: asyncio.Task[None]) -> None:
        self._calls.discard(call)
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_queued)

    async def _call(self, batch: list[_Pending]) -> None:
        args: list[int] = []
        for item in batch:
            args += (item.interval_us, item.burst, int(item.peek))
        try:
            self.round_trips += 1
            async with asyncio.timeout(self._timeout):
                reply = await self._script(keys=[item.key for item in batch], args=args)
            values = [int(v) for v in reply]
            if len(values) != 4 * len(batch):
                raise ValueError("the rate limit script answered for other buckets")
        except BaseException as exc:
            # Cancelled (the limiter closing): the waiting requests decide locally, they are
            # not cancelled themselves.
            closed = isinstance(exc, asyncio.CancelledError)
            answer = ConnectionError("rate limiter closed") if closed else exc
            for item in batch:
                if not item.answer.done():
                    item.answer.set_exception(answer)
            if closed:
                raise
            return
        for i, item in enumerate(batch):
            allowed, remaining, reset_us, retry_us = values[4 * i : 4 * i + 4]
            if not item.answer.done():
                item.answer.set_result(
                    Decision(
                        allowed=allowed == 1,
                        limit=item.burst,
                        remaining=max(0, min(remaining, item.burst - 1)),
                        reset_after=reset_us / _US_PER_S,
                        retry_after=retry_us / _US_PER_S,
                    )
                )
