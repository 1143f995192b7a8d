"""Rate limiting: the `effective_limit` rule, GCRA in memory (fake clock), and GCRA on a real
redis-server, including an outage and the recovery after it."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.auth.ratelimit import (
    MAX_PER_MINUTE,
    MIN_PER_MINUTE,
    Decision,
    MemoryRateLimiter,
    effective_limit,
)
from gateway.auth.ratelimit_exact import RedisRateLimiter
from tests.redis_support import RedisServer, silent_server

PREFIX = "test-gw:"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --------------------------------------------------------------------------- effective_limit


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, 100.0),
        (0, 100.0),
        (-5, 100.0),
        ("abc", 100.0),
        ("", 100.0),
        ("30", 30.0),
        (" 2.5 ", 2.5),
        ("0", 100.0),
        ("-3", 100.0),
        ("nan", 100.0),
        ("1e999", 100.0),
        ("9" * 100, 100.0),
        (math.nan, 100.0),
        (math.inf, 100.0),
        (-math.inf, 100.0),
        (True, 100.0),
        (False, 100.0),
        (1e12, MAX_PER_MINUTE),
        (10**400, MAX_PER_MINUTE),
        (6, 6.0),
        (6.5, 6.5),
        (0.001, MIN_PER_MINUTE),
        ([30], 100.0),
        ({"per_minute": 30}, 100.0),
        (b"30", 100.0),
    ],
)
def test_effective_limit_rule(raw: object, expected: float) -> None:
    assert effective_limit(raw, 100.0) == expected


@pytest.mark.parametrize("raw", [None, 0, -5, "abc"])
def test_effective_limit_default_zero_leaves_keys_without_a_limit_unlimited(raw: object) -> None:
    assert effective_limit(raw, 0) is None


@pytest.mark.parametrize(("raw", "expected"), [(30, 30.0), ("6", 6.0)])
def test_effective_limit_default_zero_still_honours_a_key_limit(
    raw: object, expected: float
) -> None:
    assert effective_limit(raw, 0) == expected


def test_effective_limit_caps_the_default_too() -> None:
    assert effective_limit(None, 1e9) == MAX_PER_MINUTE


# --------------------------------------------------------------------------- Decision


def test_headers_when_allowed() -> None:
    decision = Decision(allowed=True, limit=6, remaining=4, reset_after=19.2, retry_after=0.0)
    assert decision.headers() == {
        "RateLimit-Limit": "6",
        "RateLimit-Remaining": "4",
        "RateLimit-Reset": "20",
    }


def test_headers_when_refused_round_up_and_never_say_zero() -> None:
    decision = Decision(allowed=False, limit=6, remaining=0, reset_after=59.01, retry_after=0.01)
    assert decision.headers() == {
        "RateLimit-Limit": "6",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "60",
        "Retry-After": "1",
    }


# --------------------------------------------------------------------------- memory GCRA


async def test_memory_allows_the_burst_then_refuses_with_retry_after() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    decisions = [await limiter.hit("fp-a", 6) for _ in range(7)]

    assert [d.allowed for d in decisions] == [True] * 6 + [False]
    assert [d.remaining for d in decisions] == [5, 4, 3, 2, 1, 0, 0]
    assert all(d.limit == 6 for d in decisions)
    refused = decisions[-1]
    assert refused.retry_after == pytest.approx(10.0)
    assert refused.reset_after == pytest.approx(60.0)
    assert refused.headers()["Retry-After"] == "10"


async def test_memory_refills_one_request_per_interval() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    for _ in range(6):
        assert (await limiter.hit("fp-a", 6)).allowed

    clock.advance(9.9)
    early = await limiter.hit("fp-a", 6)
    assert not early.allowed
    assert early.retry_after == pytest.approx(0.1)
    assert early.headers()["Retry-After"] == "1"

    clock.advance(0.1)
    assert (await limiter.hit("fp-a", 6)).allowed
    assert not (await limiter.hit("fp-a", 6)).allowed

    clock.advance(25)  # 2.5 intervals: two more requests, not three
    assert [(await limiter.hit("fp-a", 6)).allowed for _ in range(3)] == [True, True, False]

    clock.advance(60)
    assert [(await limiter.hit("fp-a", 6)).allowed for _ in range(7)] == [True] * 6 + [False]


async def test_memory_refused_requests_do_not_push_the_limit_further_away() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    for _ in range(6):
        await limiter.hit("fp-a", 6)
    for _ in range(100):
        assert not (await limiter.hit("fp-a", 6)).allowed
    clock.advance(10)
    assert (await limiter.hit("fp-a", 6)).allowed


async def test_memory_buckets_are_independent() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    for _ in range(6):
        assert (await limiter.hit("fp-a", 6)).allowed
    assert not (await limiter.hit("fp-a", 6)).allowed
    assert (await limiter.hit("fp-b", 6)).allowed
    assert (await limiter.hit("fp-b", 6)).remaining == 4


async def test_memory_configured_burst_applies_to_every_key() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(burst=2, clock=clock)
    assert [(await limiter.hit("fp-a", 60)).allowed for _ in range(3)] == [True, True, False]
    clock.advance(1)
    assert (await limiter.hit("fp-a", 60)).allowed
    assert (await limiter.hit("fp-a", 60)).limit == 2


async def test_memory_fractional_limit_has_a_burst_of_one() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    first = await limiter.hit("fp-a", 0.5)
    second = await limiter.hit("fp-a", 0.5)
    assert (first.allowed, first.limit, first.remaining) == (True, 1, 0)
    assert not second.allowed
    assert second.retry_after == pytest.approx(120.0)


async def test_memory_bucket_count_is_bounded() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(max_buckets=3, clock=clock)
    for i in range(50):
        await limiter.hit(f"fp-{i}", 6)
        assert len(limiter) <= 3

    # Refilled buckets equal fresh ones and are dropped as later requests come in.
    clock.advance(3600)
    await limiter.hit("fp-new", 6)
    await limiter.hit("fp-new", 6)
    assert len(limiter) == 1


async def test_memory_full_buckets_are_not_kept() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    await limiter.hit("fp-a", 6)
    clock.advance(11)
    await limiter.hit("fp-b", 6)
    assert len(limiter) == 1


@pytest.mark.parametrize("per_minute", [0, -1, math.nan, math.inf])
async def test_memory_rejects_an_unchecked_limit(per_minute: float) -> None:
    with pytest.raises(ValueError, match="effective_limit"):
        await MemoryRateLimiter().hit("fp-a", per_minute)


# --------------------------------------------------------------------------- Redis GCRA


def _client(url: str) -> redis.asyncio.Redis:
    # One immediate retry lets a pooled connection that died with a restarted Redis reconnect.
    return redis.asyncio.Redis.from_url(
        url, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 1)
    )


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
async def clients(redis_server: RedisServer) -> AsyncIterator[list[redis.asyncio.Redis]]:
    made = [_client(redis_server.url), _client(redis_server.url)]
    try:
        yield made
    finally:
        for client in made:
            await client.aclose()


def _limiter(
    client: redis.asyncio.Redis,
    *,
    on_fallback: Callable[[], None] | None = None,
    clock: Callable[[], float] | None = None,
    timeout: float = 0.25,
) -> RedisRateLimiter:
    extra = {"clock": clock} if clock is not None else {}
    return RedisRateLimiter(
        client,
        prefix=PREFIX,
        fallback=MemoryRateLimiter(),
        on_fallback=on_fallback,
        timeout=timeout,
        **extra,
    )


async def test_redis_limit_is_shared_by_two_replicas(
    clients: list[redis.asyncio.Redis],
) -> None:
    fallbacks = Counter()
    replicas = [_limiter(c, on_fallback=fallbacks) for c in clients]
    decisions = [await replicas[i % 2].hit("fp-shared", 6) for i in range(20)]

    assert [d.allowed for d in decisions] == [True] * 6 + [False] * 14
    assert [d.remaining for d in decisions[:6]] == [5, 4, 3, 2, 1, 0]
    refused = decisions[-1]
    assert 9.0 < refused.retry_after <= 10.0
    assert 59.0 < refused.reset_after <= 60.0
    assert fallbacks.count == 0


async def test_peek_says_what_a_request_would_get_and_spends_nothing(
    clients: list[redis.asyncio.Redis],
) -> None:
    memory = MemoryRateLimiter()
    for limiter in (_limiter(clients[0]), memory):
        assert (await limiter.peek("fp-peek", 2)).allowed
        assert await clients[1].keys(f"{PREFIX}*") == []  # a peek writes nothing
        for _ in range(5):
            peeked = await limiter.peek("fp-peek", 2)
            assert (peeked.allowed, peeked.remaining) == (True, 1)
        assert [(await limiter.hit("fp-peek", 2)).allowed for _ in range(3)] == [
            True,
            True,
            False,
        ]
        refused = await limiter.peek("fp-peek", 2)
        assert not refused.allowed and 29.0 < refused.retry_after <= 30.0
        await clients[1].flushdb()
    assert len(memory) == 1


async def test_redis_key_name_and_expiry(clients: list[redis.asyncio.Redis]) -> None:
    limiter = _limiter(clients[0])
    await limiter.hit("fp-ttl", 6)
    # The key vanishes once the bucket has refilled (one 10 s interval after one request).
    ttl = await clients[1].pttl(f"{PREFIX}rl:fp-ttl")
    assert 9_000 < ttl <= 10_000
    assert await clients[1].keys(f"{PREFIX}*") == [f"{PREFIX}rl:fp-ttl".encode()]


async def test_redis_script_is_atomic_under_concurrency(
    clients: list[redis.asyncio.Redis],
) -> None:
    # A generous timeout: this is about the script's atomicity, and a busy machine
    # must not turn a slow Redis answer into a (correct, but different) fallback.
    replicas = [_limiter(c, timeout=5.0) for c in clients]
    decisions = await asyncio.gather(*(replicas[i % 2].hit("fp-race", 10) for i in range(50)))
    assert sum(d.allowed for d in decisions) == 10
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(10))


async def test_redis_outage_falls_back_to_memory_and_recovers(
    redis_server: RedisServer, clients: list[redis.asyncio.Redis]
) -> None:
    clock = FakeClock()
    fallbacks = Counter()
    limiter = _limiter(clients[0], on_fallback=fallbacks, clock=clock)
    key = f"{PREFIX}rl:fp-outage"

    assert (await limiter.hit("fp-outage", 6)).allowed
    assert await clients[1].exists(key)

    redis_server.stop()
    during = [await limiter.hit("fp-outage", 6) for _ in range(7)]
    # The local limiter starts with an empty bucket of its own.
    assert [d.allowed for d in during] == [True] * 6 + [False]
    assert fallbacks.count == 7
    assert limiter.degraded

    redis_server.start()  # same port, empty data, no scripts loaded
    await limiter.hit("fp-outage", 6)
    assert fallbacks.count == 8, "Redis is skipped during the back-off after a failure"

    clock.advance(1.0)
    back = await limiter.hit("fp-outage", 6)
    assert back.allowed
    assert back.remaining == 5
    assert fallbacks.count == 8
    assert not limiter.degraded
    assert await clients[1].exists(key)


async def test_redis_that_does_not_answer_times_out_into_the_fallback() -> None:
    async with silent_server() as url:
        client = _client(url)
        fallbacks = Counter()
        try:
            limiter = _limiter(client, on_fallback=fallbacks, timeout=0.1)
            loop = asyncio.get_running_loop()
            started = loop.time()
            decision = await limiter.hit("fp-slow", 6)
            assert loop.time() - started < 0.5
            assert decision.allowed
            assert fallbacks.count == 1
        finally:
            await client.aclose()


async def test_failing_fallback_hook_does_not_fail_the_request(
    redis_server: RedisServer, clients: list[redis.asyncio.Redis]
) -> None:
    def broken() -> None:
        raise RuntimeError("metrics are down too")

    limiter = _limiter(clients[0], on_fallback=broken)
    redis_server.stop()
    assert (await limiter.hit("fp-hook", 6)).allowed
