"""A fleet under bounded concurrent load: two `serve --workers 2` groups (four processes) on one
redis-server, each process with a Redis pool far smaller than the requests in flight.

What must hold however busy the pool is: one shared rate limit (no silent fall back to
per-process limits), one tower call per cold key for the whole fleet, and, in batched mode,
no more admitted than its stated bound.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio

from gateway.auth.ratelimit_batched import overshoot_bound
from tests.conftest import FakeTower
from tests.redis_support import RedisServer
from tests.test_replicas import metric
from tests.test_workers import Group, StartGroup, start_group

__all__ = ["start_group"]  # the fixture, shared with the worker tests

pytestmark = pytest.mark.redis

# Two connections per process (one is the revocation subscription's) against tens of
# requests in flight per process: calls wait for a connection, none may be refused.
SMALL_POOL = {"max_connections": 2, "pool_timeout": 5.0}


async def fleet(start: StartGroup, redis_url: str, **extra: object) -> list[Group]:
    settings = {"redis": {"url": redis_url, **SMALL_POOL}, **extra}
    return [await start(**settings), await start(**settings)]


async def bounded(calls: list[Callable[[], Awaitable[int]]], at_once: int) -> list[int]:
    gate = asyncio.Semaphore(at_once)

    async def one(call: Callable[[], Awaitable[int]]) -> int:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(call) for call in calls)))


def request(group: Group, path: str, key: str) -> Callable[[], Awaitable[int]]:
    async def call() -> int:
        status, _ = await group.get(path, headers={"X-API-Key": key})
        return status

    return call


async def fleet_metric(groups: list[Group], name: str) -> float:
    return sum([metric(await group.metrics(), name) for group in groups])


async def test_a_shared_limit_holds_with_more_requests_in_flight_than_connections(
    start_group: StartGroup, redis_server: RedisServer, fake_tower: FakeTower
) -> None:
    groups = await fleet(
        start_group, redis_server.url, rate_limit={"backend": "redis", "default_per_minute": 30}
    )
    fake_tower.add("busy-limited-key", key_id="k-busy", user_id="u", role="operator")
    started = time.monotonic()
    calls = [request(groups[i % 2], f"/limited/{i}", "busy-limited-key") for i in range(150)]
    statuses = await bounded(calls, at_once=60)
    elapsed = time.monotonic() - started

    assert set(statuses) <= {200, 429}
    # GCRA: the burst of 30, plus one request per 2 s of the test.
    allowed = statuses.count(200)
    assert 30 <= allowed <= 30 + math.ceil(elapsed / 2) + 1, (allowed, elapsed)
    assert await fleet_metric(groups, "tower_gateway_rate_limit_fallbacks_total") == 0
    assert await fleet_metric(groups, "tower_gateway_redis_errors_total") == 0
    # The pool was the bottleneck: calls waited for a connection, and got one.
    assert await fleet_metric(groups, "tower_gateway_redis_pool_waits_total") > 0


async def test_cold_keys_under_load_cost_one_tower_call_each_for_the_fleet(
    start_group: StartGroup, redis_server: RedisServer, fake_tower: FakeTower
) -> None:
    groups = await fleet(start_group, redis_server.url)
    keys = [f"cold-fleet-key-{i:04d}" for i in range(200)]
    for i, key in enumerate(keys):
        fake_tower.add(key, key_id=f"k-cold-{i}", user_id="u", role="operator")
    fake_tower.delay = 0.05  # the other group asks while the first call is on its way
    calls = [request(group, f"/cold/{i}", key) for i, key in enumerate(keys) for group in groups]
    statuses = await bounded(calls, at_once=100)

    assert statuses == [200] * 400
    assert len(fake_tower.calls) == 200 and set(fake_tower.calls) == set(keys)
    assert await fleet_metric(groups, "tower_gateway_redis_errors_total") == 0


async def test_batched_mode_admits_within_its_stated_bound(
    start_group: StartGroup, redis_server: RedisServer, fake_tower: FakeTower
) -> None:
    burst, per_minute, sync_interval, processes = 8, 120, 0.1, 4
    groups = await fleet(
        start_group,
        redis_server.url,
        rate_limit={
            "backend": "redis",
            "mode": "batched",
            "sync_interval": sync_interval,
            "default_per_minute": per_minute,
            "burst": burst,
        },
    )
    fake_tower.add("batched-key", key_id="k-batched", user_id="u", role="operator")
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        deadline = time.monotonic() + 10
        while await client.zcard("tower-gateway:rl-processes") < processes:
            assert time.monotonic() < deadline, "the processes never settled"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    await asyncio.sleep(3 * sync_interval)  # every process has settled since: it knows P

    statuses: list[int] = []
    started = time.monotonic()

    async def loop(group: Group) -> None:
        while time.monotonic() - started < 2.0:
            statuses.append(await request(group, "/batched", "batched-key")())

    await asyncio.gather(*(loop(groups[i % 2]) for i in range(16)))
    elapsed = time.monotonic() - started

    assert set(statuses) <= {200, 429} and len(statuses) > 50
    allowed = statuses.count(200)
    exact_most = burst + math.ceil(per_minute / 60 * elapsed) + 1
    bound = overshoot_bound(burst, per_minute, processes, sync_interval)
    assert per_minute / 60 * elapsed <= allowed <= exact_most + bound, (allowed, elapsed)
    assert await fleet_metric(groups, "tower_gateway_rate_limit_fallbacks_total") == 0
