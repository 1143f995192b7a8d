"""Shared rate limits without a Redis round trip per request (`rate_limit.mode: batched`): each
process decides on its own share of every bucket and settles with Redis every
`rate_limit.sync_interval` seconds.

A process keeps, per bucket, the shared GCRA arrival time as Redis last told it, advanced by
the requests it admitted since. It admits a request when that bucket, with a burst of
`ceil(burst / P)` (P: the processes that settled recently, counted on Redis), still has room.
Every sync interval one script call charges what it admitted on Redis (the same `rl:` keys
the exact mode uses, so both modes can share a fleet during a change) and brings back the
shared state of the buckets it touched, and P.

What it costs in accuracy: the requests the other processes admitted since their last
settle are unseen, so the fleet can admit more than the exact mode would, bounded by
`overshoot_bound` (about two bursts plus two sync intervals of refill per process, in any
window) while each process keeps using the key: a settle brings back only the buckets the
process touched since the last one, so a process coming back to a key after a pause may
spend its share once more on an old view. Everything admitted is charged, so the overshoot
is paid back by refusals and the long-run rate is exact. A process alone on a key (sticky
load balancing) gets a burst of `ceil(burst / P)` and the full steady rate. Until its first
settle, a process knows of no other (P = 1).

When Redis fails, decisions go on locally on the last shared state (`on_fallback` for each,
`on_error` for each failed settle); what was admitted meanwhile is charged when it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

import redis.asyncio

from gateway.auth.ratelimit import _US_PER_S, Decision, _gcra, _plan, call_hook, decide_in
from gateway.replicas.pool import PoolExhausted

log = logging.getLogger(__name__)

DEFAULT_SYNC_INTERVAL: Final = 0.1
DEFAULT_TIMEOUT: Final = 0.25
# A process counts in P while it settled within this many sync intervals (at least MIN_PRESENCE
# seconds), so one late settle does not double every other process's share.
PRESENCE_INTERVALS: Final = 3
MIN_PRESENCE: Final = 1.0

# KEYS[1]: the processes (a sorted set: id -> last settle, Redis µs); KEYS[2..]: the buckets.
# ARGV[1]: this process's id; ARGV[2]: how long a process counts without settling (µs); then
# per bucket: emission interval (µs), burst, requests admitted since the last settle.
# Returns P, then per bucket how far its arrival time lies ahead of now (µs, 0 for full).
_SETTLE_LUA: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local presence = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - presence)
redis.call('PEXPIRE', KEYS[1], math.ceil(presence / 1000))
local out = {redis.call('ZCARD', KEYS[1])}
for i = 2, #KEYS do
  local interval = tonumber(ARGV[3 * i - 3])
  local burst = tonumber(ARGV[3 * i - 2])
  local count = tonumber(ARGV[3 * i - 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now) or now
  if tat < now then tat = now end
  -- Admissions are facts: charged even beyond the burst, so an overshoot is paid back by
  -- refusals; but a time further ahead than two bursts was written by someone else.
  if tat > now + 2 * interval * burst then tat = now + 2 * interval * burst end
  if count > 0 then
    tat = tat + count * interval
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX',
               math.max(1, math.ceil((tat - now) / 1000)))
  end
  out[#out + 1] = tat - now
end
return out
"""


def overshoot_bound(burst: int, per_minute: float, processes: int, sync_interval: float) -> int:
    """The most requests a fleet of `processes` in batched mode may admit, in any window, beyond
    what the exact mode would: each process's admissions since its last settle, and the others'
    it has not seen yet, are at most its share, one sync interval of refill and one request."""
    share = math.ceil(burst / processes)
    refill = math.ceil(per_minute / 60.0 * sync_interval)
    return 2 * processes * (share + refill + 1)


class BatchedRateLimiter:
    """GCRA on a local share of buckets shared through Redis, settled in the background.

    `decide` never awaits; `hit` starts the settle task on first use (or call `start`). The
    client belongs to the caller; `close()` settles what is left (bounded by `timeout`) and
    leaves it open.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str,
        burst: int | None = None,
        sync_interval: float = DEFAULT_SYNC_INTERVAL,
        on_fallback: Callable[[], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_buckets: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not sync_interval > 0:
            raise ValueError("sync_interval must be positive")
        self._prefix = prefix + "rl:"
        self._members = prefix + "rl-processes"
        self._burst = burst
        self._sync_interval = sync_interval
        self._presence_us = round(max(PRESENCE_INTERVALS * sync_interval, MIN_PRESENCE) * _US_PER_S)
        self._on_fallback = on_fallback
        self._on_error = on_error
        self._timeout = timeout
        self._max_buckets = max_buckets
        self._clock = clock
        self._origin = uuid.uuid4().hex
        self._script = client.register_script(_SETTLE_LUA)
        # Per bucket: the arrival time this process decides on (its clock).
        self._tats: OrderedDict[str, float] = OrderedDict()
        # Per bucket touched since the last settle: [interval µs, burst, admitted].
        self._touched: dict[str, list[int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._degraded = False
        self.peers = 1
        self.settles = 0

    @property
    def degraded(self) -> bool:
        """True while settles fail: decisions rest on the last shared state."""
        return self._degraded

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="tower-gateway-rate-limit-settle"
            )

    async def hit(self, bucket: str, per_minute: float) -> Decision:
        if self._task is None:
            self.start()
        return self.decide(bucket, per_minute)

    async def peek(self, bucket: str, per_minute: float) -> Decision:
        """What `hit` would answer now, on this process's share, counting nothing."""
        interval, burst = _plan(per_minute, self._burst)
        share = max(1, math.ceil(burst / self.peers))
        now = self._clock()
        decision = _gcra(self._tats.get(bucket, now), now, interval, share)[1]
        return self._as_burst(decision, burst)

    def decide(self, bucket: str, per_minute: float) -> Decision:
        interval, burst = _plan(per_minute, self._burst)
        share = max(1, math.ceil(burst / self.peers))
        decision = decide_in(self._tats, bucket, self._clock(), interval, share, self._max_buckets)
        touched = self._touched.get(bucket)
        if touched is None:
            touched = self._touched[bucket] = [0, 0, 0]
        touched[0], touched[1] = max(1, round(interval * _US_PER_S)), burst
        touched[2] += decision.allowed
        if self._degraded:
            call_hook(self._on_fallback)
        return self._as_burst(decision, burst)

    @staticmethod
    def _as_burst(decision: Decision, burst: int) -> Decision:
        """The decision on a share, reported with the key's whole burst as its limit."""
        if decision.limit == burst:
            return decision
        return Decision(
            decision.allowed, burst, decision.remaining, decision.reset_after, decision.retry_after
        )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if any(counts[2] for counts in self._touched.values()):
            await self.settle()  # what was admitted since the last settle still counts
        self._tats.clear()

    async def settle(self) -> bool:
        """Charge what was admitted since the last settle and take in the shared state of the
        buckets touched; False (and counted) when Redis did not answer."""
        touched, self._touched = self._touched, {}
        args: list[int | str] = [self._origin, self._presence_us]
        for counts in touched.values():
            args += counts
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._script(
                    keys=[self._members, *(self._prefix + bucket for bucket in touched)], args=args
                )
            values = [int(v) for v in reply]
            if len(values) != 1 + len(touched):
                raise ValueError("the settle script answered for other buckets")
        except (redis.RedisError, OSError, TimeoutError, ValueError) as exc:
            self._failed(exc, touched)
            return False
        self.settles += 1
        self.peers = max(1, values[0])
        if self._degraded:
            self._degraded = False
            log.info("redis rate limiter available again")
        now = self._clock()
        for bucket, ahead_us in zip(touched, values[1:], strict=True):
            # What was admitted here while the settle was on its way is not in the answer yet.
            later = self._touched.get(bucket)
            pending_us = later[2] * later[0] if later is not None else 0
            tat = now + (ahead_us + pending_us) / _US_PER_S
            self._tats.pop(bucket, None)
            if tat > now:
                self._tats[bucket] = tat
        return True

    async def _run(self) -> None:
        while True:
            try:
                await self.settle()
            except Exception:  # the settle loop must outlive any bug in one round
                log.exception("rate limit settle failed")
            await asyncio.sleep(self._sync_interval)

    def _failed(self, exc: Exception, touched: dict[str, list[int]]) -> None:
        # Charged at the next settle that gets through; at most max_buckets of them kept.
        for bucket, counts in touched.items():
            now = self._touched.get(bucket)
            if now is None:
                if len(self._touched) < self._max_buckets:
                    self._touched[bucket] = counts
            else:
                now[2] += counts[2]
        on_error, pool = self._on_error, isinstance(exc, PoolExhausted)
        if on_error is not None:
            op = "pool" if pool else "rate_limit"
            call_hook(lambda: on_error(op))
        if not pool and not self._degraded:
            self._degraded = True
            log.warning(
                "redis rate limiter unavailable (%s), deciding on the last shared state",
                type(exc).__name__,
            )
