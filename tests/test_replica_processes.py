"""Replicas as real processes: two `serve --workers 2` groups sharing one redis-server.

Four gateway processes that share nothing but Redis: one tower call per cold
key between them, one rate limit across them, and a revocation on one replica
seen by the other within a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

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


async def test_a_revocation_under_load_wins_on_the_replica_that_takes_it(
    start_group: StartGroup, redis_server: RedisServer, fake_tower: FakeTower
) -> None:
    """The key busy on the replica that revokes it (both its workers), the race repeated."""
    first, second = await two_replicas(
        start_group,
        redis_server.url,
        rate_limit={"default_per_minute": 1_000_000},
        credentials={"failed_auth_per_minute": 0},
    )
    for trial in range(4):
        key, key_id = f"busy-process-key-{trial}", f"k-busy-{trial}"
        fake_tower.add(key, key_id=key_id, user_id="u", role="operator")
        seen: list[tuple[str, float, int]] = []
        stop = asyncio.Event()

        tasks = [asyncio.create_task(load(first, "first", key, stop, seen)) for _ in range(12)]
        tasks += [asyncio.create_task(load(second, "second", key, stop, seen)) for _ in range(4)]
        try:
            await until(_enough(seen), 10.0, "the load to start")
            fake_tower.keys.pop(key)  # the tower now refuses it
            status, _ = await first.ops_json("DELETE", f"/admin/cache/{key_id}", headers=ADMIN)
            assert status == 200
            revoked_at = time.monotonic()
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        late = {
            name: [s for n, started, s in seen if n == name and started > revoked_at + grace]
            for name, grace in (("first", 0.0), ("second", 0.2))
        }
        for name, statuses in late.items():
            assert statuses and set(statuses) == {401}, (trial, name, statuses.count(200))


async def load(
    group: Group, name: str, key: str, stop: asyncio.Event, seen: list[tuple[str, float, int]]
) -> None:
    """Requests one after the other until `stop`: (group name, start time, status) each."""
    while not stop.is_set():
        started = time.monotonic()
        status, _ = await group.get("/busy", headers={"X-API-Key": key})
        seen.append((name, started, status))


def _enough(seen: list[tuple[str, float, int]]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return sum(1 for name, _, _ in seen if name == "first") > 30

    return check
