"""Replicas as real processes: two `serve --workers 2` groups sharing one redis-server.

Four gateway processes that share nothing but Redis: one tower call per cold
key between them, one rate limit across them, and a revocation on one replica
seen by the other within a second.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import FakeTower
from tests.redis_support import RedisServer
from tests.test_workers import ADMIN, Group, StartGroup, start_group, until

__all__ = ["start_group"]  # the fixture, shared with the worker tests

pytestmark = pytest.mark.redis


async def two_replicas(start: StartGroup, redis_url: str, **extra: object) -> tuple[Group, Group]:
    settings = {"redis": {"url": redis_url}, **extra}
    first = await start(**settings)
    second = await start(**settings)
    return first, second


async def test_a_cold_key_hit_on_both_replicas_at_once_is_one_tower_call(
    start_group: StartGroup, redis_server: RedisServer, fake_tower: FakeTower
) -> None:
    first, second = await two_replicas(start_group, redis_server.url)
    fake_tower.add("cold-key", key_id="k9", user_id="u9", role="operator")
    fake_tower.delay = 0.3  # long enough for every request to arrive while it is cold
    headers = {"X-API-Key": "cold-key"}
    statuses = await asyncio.gather(
        *((first if i % 2 else second).get(f"/cold/{i}", headers=headers) for i in range(10))
    )
    assert [status for status, _ in statuses] == [200] * 10
    assert fake_tower.calls.count("cold-key") == 1


async def test_a_rate_limit_holds_across_replicas(
    start_group: StartGroup, redis_server: RedisServer, fake_tower: FakeTower
) -> None:
    first, second = await two_replicas(
        start_group,
        redis_server.url,
        rate_limit={"backend": "redis", "default_per_minute": 6},
    )
    fake_tower.add("limited-key", key_id="k7", user_id="u7", role="operator")
    headers = {"X-API-Key": "limited-key"}
    statuses = [
        (await (first if i % 2 else second).get(f"/limited/{i}", headers=headers))[0]
        for i in range(9)
    ]
    assert statuses == [200] * 6 + [429] * 3


async def test_a_revocation_on_one_replica_is_seen_by_the_other_within_a_second(
    start_group: StartGroup, redis_server: RedisServer, fake_tower: FakeTower
) -> None:
    first, second = await two_replicas(start_group, redis_server.url)
    headers = {"X-API-Key": "good-key"}
    for group in (first, second):
        for i in range(4):  # several requests: both workers of each group cache it
            assert (await group.get(f"/warm/{i}", headers=headers))[0] == 200
    assert fake_tower.calls.count("good-key") == 1

    fake_tower.keys.pop("good-key")  # the tower now refuses it
    status, _ = await first.ops_json("DELETE", "/admin/cache/k1", headers=ADMIN)
    assert status == 200
    revoked_at = time.monotonic()

    async def refused_by_second() -> bool:
        return (await second.get("/after", headers=headers))[0] == 401

    await until(refused_by_second, 1.0, "the other replica to drop the revoked key")
    assert time.monotonic() - revoked_at < 1.5
