"""Redis under load, in one process against a real redis-server: the bounded connection pool
(waits, then counts exhaustion as a Redis error without pausing), the exact limiter's
coalesced round trips, the batched limiter (local decisions, settles, shares, outages), and
lookups woken by the lock holder's "filled" message instead of polling.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import redis.asyncio

from gateway.auth.ratelimit import MemoryRateLimiter
from gateway.auth.ratelimit_batched import BatchedRateLimiter, overshoot_bound
from gateway.auth.ratelimit_exact import RedisRateLimiter
from gateway.replicas.connection import RedisFaults, redis_client
from gateway.replicas.pool import PoolExhausted, WaitingPool
from tests.conftest import GatewayFactory
from tests.redis_support import RedisServer, silent_server
from tests.test_replicas import digest, get, replicas

pytestmark = pytest.mark.redis

PREFIX = "tower-gateway:"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, op: str = "") -> None:
        self.calls.append(op)


def exact(client: redis.asyncio.Redis, **kw: object) -> RedisRateLimiter:
    return RedisRateLimiter(
        client,
        prefix=PREFIX,
        fallback=MemoryRateLimiter(),
        timeout=5.0,
        **kw,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- the pool


async def test_calls_beyond_the_pool_size_wait_for_a_connection(redis_server: RedisServer) -> None:
    client = redis_client(redis_server.url, max_connections=2, pool_timeout=5.0)
    try:
        # 50 blocking calls of 20 ms on two connections: they queue, none is refused.
        calls = (client.blpop(["nothing"], timeout=0.02) for _ in range(50))
        replies = await asyncio.gather(*calls)
        assert replies == [None] * 50
    finally:
        await client.aclose()


async def test_an_exhausted_pool_is_a_counted_error_that_does_not_pause_redis(
    redis_server: RedisServer,
) -> None:
    client = redis_client(redis_server.url, max_connections=1, pool_timeout=0.05)
    errors, fallbacks = Recorder(), Recorder()
    limiter = exact(client, on_error=errors, on_fallback=fallbacks)
    try:
        busy = asyncio.create_task(client.blpop(["nothing"], timeout=0.3))
        await asyncio.sleep(0.1)  # the only connection is taken
        decision = await limiter.hit("fp-pool", 6)
        assert decision.allowed  # decided locally, this once
        assert errors.calls == ["pool"] and len(fallbacks.calls) == 1
        assert not limiter.degraded
        await busy
        # No back-off: the very next decision is Redis's again.
        assert (await limiter.hit("fp-pool", 6)).remaining == 5
        assert len(fallbacks.calls) == 1
        assert await client.exists(f"{PREFIX}rl:fp-pool")
        pool = client.connection_pool
        assert isinstance(pool, WaitingPool) and pool.exhausted == 1 and pool.waits >= 1
    finally:
        await limiter.close()
        await client.aclose()


def test_pool_exhaustion_is_counted_apart_and_never_pauses_the_request_path() -> None:
    ops = Recorder()
    faults = RedisFaults(ops)
    faults.record("claim", PoolExhausted("busy"))
    assert ops.calls == ["pool"] and not faults.skipping()
    faults.record("claim", ConnectionError("refused"))
    assert ops.calls == ["pool", "claim"] and faults.skipping()


# --------------------------------------------------------------------------- exact mode


async def test_decisions_of_one_tick_share_a_round_trip(redis_client: redis.asyncio.Redis) -> None:
    limiter = exact(redis_client)
    decisions = await asyncio.gather(*(limiter.hit(f"fp-{i % 5}", 6) for i in range(100)))
    # At most two calls in flight: the first carries one tick's decisions, the rest queue.
    assert limiter.round_trips <= 3
    for bucket in range(5):
        mine = decisions[bucket::5]
        assert sum(d.allowed for d in mine) == 6
        assert sorted(d.remaining for d in mine if d.allowed) == [0, 1, 2, 3, 4, 5]


async def test_a_failed_round_trip_answers_every_decision_it_carried(
    redis_server: RedisServer,
) -> None:
    client = redis_client(redis_server.url)
    errors, fallbacks = Recorder(), Recorder()
    limiter = exact(client, on_error=errors, on_fallback=fallbacks)
    try:
        redis_server.stop()
        decisions = await asyncio.gather(*(limiter.hit("fp-down", 6) for _ in range(8)))
        assert [d.allowed for d in decisions] == [True] * 6 + [False] * 2
        assert len(fallbacks.calls) == 8 and set(errors.calls) == {"rate_limit"}
        assert limiter.degraded
    finally:
        await limiter.close()
        await client.aclose()


# --------------------------------------------------------------------------- batched mode


def batched(client: redis.asyncio.Redis, **kw: object) -> BatchedRateLimiter:
    return BatchedRateLimiter(client, prefix=PREFIX, timeout=5.0, **kw)  # type: ignore[arg-type]


async def test_batched_decisions_make_no_round_trip_and_settle_later(
    redis_client: redis.asyncio.Redis,
) -> None:
    limiter = batched(redis_client, sync_interval=3600)  # settles only when told
    key = f"{PREFIX}rl:fp-b"
    decisions = [limiter.decide("fp-b", 60) for _ in range(70)]
    assert sum(d.allowed for d in decisions) == 60
    assert not await redis_client.exists(key)  # nothing on Redis yet
    assert await limiter.settle()
    ahead_ms = await redis_client.pttl(key)
    assert 59_000 < ahead_ms <= 60_000  # 60 admissions of one second each, charged
    assert limiter.peers == 1


async def test_batched_processes_split_the_burst_and_see_each_other(
    redis_client: redis.asyncio.Redis,
) -> None:
    first, second = batched(redis_client), batched(redis_client)
    for limiter in (first, second, first):
        assert await limiter.settle()
    assert first.peers == second.peers == 2
    # 20/min (one request every 3 s), burst 20: a share of 10 each.
    assert sum(first.decide("fp-share", 20).allowed for _ in range(20)) == 10
    assert await first.settle()  # 30 s charged
    # The second has not seen the bucket yet: its first request is its own guess (what the
    # overshoot bound is about); once settled, it sees the first's ten and refuses.
    assert second.decide("fp-share", 20).allowed
    assert await second.settle()
    assert not second.decide("fp-share", 20).allowed
    assert 32_000 < await redis_client.pttl(f"{PREFIX}rl:fp-share") <= 33_000
    await first.close()
    await second.close()


async def test_batched_mode_runs_on_through_an_outage_and_charges_it_afterwards(
    redis_server: RedisServer,
) -> None:
    client = redis_client(redis_server.url)
    errors, fallbacks = Recorder(), Recorder()
    limiter = batched(client, sync_interval=3600, on_error=errors, on_fallback=fallbacks)
    try:
        assert await limiter.settle()
        redis_server.stop()
        assert not await limiter.settle()
        assert limiter.degraded and errors.calls == ["rate_limit"]
        allowed = sum(limiter.decide("fp-out", 6).allowed for _ in range(8))
        assert allowed == 6 and len(fallbacks.calls) == 8
        assert not await limiter.settle()  # still down: the counts are kept
        redis_server.start()  # empty
        assert await limiter.settle()
        assert not limiter.degraded
        assert 59_000 < await client.pttl(f"{PREFIX}rl:fp-out") <= 60_000
    finally:
        await limiter.close()
        await client.aclose()


def test_the_stated_overshoot_bound() -> None:
    # Four processes, burst 8, 120/min, settling every 100 ms: shares of 2, one request of
    # refill per interval, one more for rounding, counted twice (unsent and unseen).
    assert overshoot_bound(8, 120, 4, 0.1) == 2 * 4 * (2 + 1 + 1)
    assert overshoot_bound(600, 600, 1, 0.1) == 2 * (600 + 1 + 1)


async def test_a_fleet_of_batched_processes_stays_within_the_bound(
    redis_client: redis.asyncio.Redis,
) -> None:
    processes, burst, per_minute, interval = 4, 8, 120.0, 0.05
    fleet = [batched(redis_client, sync_interval=interval, burst=burst) for _ in range(processes)]
    for limiter in fleet:
        assert await limiter.settle()
    for limiter in fleet:
        assert await limiter.settle()
        limiter.start()
    allowed, started = 0, time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < 1.5:
            for limiter in fleet:
                allowed += (await limiter.hit("fp-fleet", per_minute)).allowed
            await asyncio.sleep(0.002)
    finally:
        for limiter in fleet:
            await limiter.close()
    exact_most = burst + math.ceil(per_minute / 60 * elapsed) + 1
    assert allowed <= exact_most + overshoot_bound(burst, per_minute, processes, interval)
    assert allowed >= per_minute / 60 * elapsed  # not starved either


# --------------------------------------------------------------------------- waiters


async def test_a_replica_waiting_on_a_lock_is_woken_when_the_answer_is_stored(
    make_gateway: GatewayFactory, redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    a, b = await replicas(make_gateway, redis_server)
    a.tower.add("woken-key-00001", key_id="k-w", user_id="u", role="operator")
    a.tower.delay = 0.4
    shared_b = b.gateway.replicas.cache if b.gateway.replicas else None
    assert shared_b is not None
    shared_b._poll = 30.0  # without the message it would wait out the lock (3.5 s)
    lock = f"{PREFIX}lock:{digest(a, 'woken-key-00001').hex()}"

    first = asyncio.create_task(get(a, "woken-key-00001"))
    deadline = time.monotonic() + 5
    while not await redis_client.exists(lock):
        assert time.monotonic() < deadline, "the first replica never took the lock"
        await asyncio.sleep(0.005)
    started = time.monotonic()
    status, _ = await get(b, "woken-key-00001")
    waited = time.monotonic() - started
    assert status == 200 and (await first)[0] == 200
    assert a.tower.calls.count("woken-key-00001") == 1
    assert waited < 1.0, waited
    assert shared_b.stats.polls >= 1 and shared_b.stats.wait_timeouts == 0


async def test_closing_the_limiter_answers_the_decisions_in_flight_locally() -> None:
    async with silent_server() as url:
        client = redis_client(url)
        fallbacks = Recorder()
        limiter = exact(client, on_fallback=fallbacks)
        try:
            pending = asyncio.create_task(limiter.hit("fp-closing", 6))
            await asyncio.sleep(0.1)  # the call is on its way to a Redis that never answers
            await limiter.close()
            decision = await pending  # not cancelled: decided locally
            assert decision.allowed and len(fallbacks.calls) == 1
        finally:
            await client.aclose()


async def test_a_peek_counts_nothing_in_either_mode(redis_client: redis.asyncio.Redis) -> None:
    exact_limiter = exact(redis_client)
    assert (await exact_limiter.hit("fp-peek", 6)).remaining == 5
    # Coalesced with a real decision on the same bucket: the peek sees it, and counts nothing.
    peeked, counted = await asyncio.gather(
        exact_limiter.peek("fp-peek", 6), exact_limiter.hit("fp-peek", 6)
    )
    assert peeked.allowed and peeked.remaining == 4 and counted.remaining == 4
    assert (await exact_limiter.hit("fp-peek", 6)).remaining == 3
    limiter = batched(redis_client, sync_interval=3600)
    assert limiter.decide("fp-peek-b", 6).remaining == 5
    assert (await limiter.peek("fp-peek-b", 6)).remaining == 4
    assert limiter.decide("fp-peek-b", 6).remaining == 4
