"""The identity cache: single flight, expiry-bounded TTLs, negatives, bounds, stale-if-error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.auth.fingerprint import Fingerprinter
from gateway.auth.identity import IdentityResolver
from gateway.config import CacheConfig, TowerConfig
from gateway.errors import InvalidKey, TowerUnavailable
from gateway.tower.client import RemoteTower
from tests.conftest import (
    TOWER_API_KEY,
    TOWER_SECRET,
    FakeTower,
    GatewayFactory,
    Harness,
    until,
)

GOOD = {"X-API-Key": "good-key-1"}


class Clock:
    """A clock tests move by hand; starts at the real time so tower expiries line up."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


ResolverFactory = Callable[..., IdentityResolver]


@pytest.fixture
async def make_resolver(fake_tower: FakeTower) -> AsyncIterator[ResolverFactory]:
    towers: list[RemoteTower] = []

    def factory(clock: Callable[[], float] = time.time, **cache: Any) -> IdentityResolver:
        tower = RemoteTower(
            TowerConfig(url=fake_tower.url, api_key=TOWER_API_KEY, secret=TOWER_SECRET, timeout=1.0)
        )
        towers.append(tower)
        return IdentityResolver(tower, CacheConfig(**cache), Fingerprinter(b"f" * 32), clock=clock)

    yield factory
    for tower in towers:
        await tower.close()


# --------------------------------------------------------------------------- single flight


async def test_concurrent_first_requests_make_one_tower_call(gw: Harness) -> None:
    gw.tower.delay = 0.3
    responses = await asyncio.gather(*(gw.client.get("/x", headers=GOOD) for _ in range(20)))
    assert [r.status for r in responses] == [200] * 20
    assert gw.tower.calls == ["good-key-1"]
    stats = gw.gateway.resolver.stats
    assert stats.tower_calls == 1
    assert stats.waiters == 19
    assert stats.misses == 20


async def test_concurrent_first_requests_for_an_invalid_key_make_one_call(gw: Harness) -> None:
    gw.tower.delay = 0.2
    responses = await asyncio.gather(
        *(gw.client.get("/x", headers={"X-API-Key": "nope"}) for _ in range(10))
    )
    assert [r.status for r in responses] == [401] * 10
    assert gw.tower.calls == ["nope"]


async def test_cancelled_first_caller_does_not_fail_the_others(
    make_resolver: ResolverFactory, fake_tower: FakeTower
) -> None:
    fake_tower.add("k", key_id="k1", user_id="u1", role="operator")
    fake_tower.gate = asyncio.Event()
    resolver = make_resolver()
    first = asyncio.create_task(resolver.resolve("k"))
    await until(lambda: fake_tower.calls == ["k"], what="the first call at the tower")
    others = [asyncio.create_task(resolver.resolve("k")) for _ in range(5)]
    await until(lambda: resolver.stats.waiters == 5, what="five callers waiting on it")
    first.cancel()
    fake_tower.gate.set()
    results = await asyncio.gather(*others)
    assert first.cancelled()
    assert {r.identity.user_id for r in results} == {"u1"}
    assert fake_tower.calls == ["k"]
    # The answer was cached although its first asker left.
    assert (await resolver.resolve("k")).source == "hit"
    assert fake_tower.calls == ["k"]


async def test_all_callers_cancelled_still_caches_the_answer(
    make_resolver: ResolverFactory, fake_tower: FakeTower
) -> None:
    fake_tower.add("k", key_id="k1", user_id="u1", role="operator")
    fake_tower.gate = asyncio.Event()
    resolver = make_resolver()
    task = asyncio.create_task(resolver.resolve("k"))
    await until(lambda: fake_tower.calls == ["k"], what="the call at the tower")
    task.cancel()
    fake_tower.gate.set()
    await until(lambda: resolver.entry_counts()[0] == 1, what="the answer to be cached")
    assert (await resolver.resolve("k")).source == "hit"
    assert fake_tower.calls == ["k"]


# --------------------------------------------------------------------------- stats


async def test_hit_miss_negative_stats(
    make_resolver: ResolverFactory, fake_tower: FakeTower
) -> None:
    fake_tower.add("k", key_id="k1", user_id="u1", role="operator")
    resolver = make_resolver()
    assert (await resolver.resolve("k")).source == "tower"
    assert (await resolver.resolve("k")).source == "hit"
    assert (await resolver.resolve("k")).source == "hit"
    for _ in range(3):
        with pytest.raises(InvalidKey) as info:
            await resolver.resolve("bad")
        assert info.value.reason == "invalid_key"
    s = resolver.stats
    assert (s.hits, s.misses, s.negative_hits, s.tower_calls) == (4, 2, 2, 2)
    assert s.hit_ratio == pytest.approx(4 / 6)
    assert resolver.entry_counts() == (1, 1)
    snap = resolver.snapshot()
    assert snap["total_cached_keys"] == 2 and snap["valid_cached_keys"] == 1
    assert snap["hits"] == 4 and snap["misses"] == 2
    assert snap["cache_hit_ratio"] == pytest.approx(4 / 6, abs=1e-5)
    assert fake_tower.calls == ["k", "bad"]


async def test_cache_key_is_not_the_raw_key(
    make_resolver: ResolverFactory, fake_tower: FakeTower
) -> None:
    fake_tower.add("raw-key-value", key_id="k1", user_id="u1", role="operator")
    resolver = make_resolver()
    resolved = await resolver.resolve("raw-key-value")
    assert b"raw-key-value" not in resolved.digest
    assert resolved.digest == Fingerprinter(b"f" * 32).digest("raw-key-value")
    assert resolved.digest != Fingerprinter(b"g" * 32).digest("raw-key-value")


# --------------------------------------------------------------------------- lifetimes


async def test_positive_entry_lives_ttl(
    make_resolver: ResolverFactory, fake_tower: FakeTower
) -> None:
    fake_tower.add("k", key_id="k1", user_id="u1", role="operator")
    clock = Clock()
    resolver = make_resolver(clock, ttl=10, stale_if_error=0)
    await resolver.resolve("k")
    clock.advance(9.9)
    assert (await resolver.resolve("k")).source == "hit"
    clock.advance(0.2)
    assert (await resolver.resolve("k")).source == "tower"
    assert fake_tower.calls == ["k", "k"]


async def test_entry_never_outlives_expires_at_with_a_clock(
    make_resolver: ResolverFactory, fake_tower: FakeTower
) -> None:
    clock = Clock()
    fake_tower.add("k", key_id="k1", user_id="u1", role="operator", expires_at=clock.now + 2)
    resolver = make_resolver(clock, ttl=300)
    await resolver.resolve("k")
    clock.advance(1.9)
    assert (await resolver.resolve("k")).source == "hit"
    clock.advance(0.1)
    with pytest.raises(InvalidKey) as info:
        await resolver.resolve("k")
    assert info.value.reason == "expired_key"


async def test_answer_already_expired_by_the_gateway_clock_is_refused(
    make_resolver: ResolverFactory, fake_tower: FakeTower
) -> None:
    # The tower judged the key at its own time; the gateway's clock is later.
    clock = Clock()
    fake_tower.add("k", key_id="k1", user_id="u1", role="operator", expires_at=clock.now + 5)
    clock.advance(10)
    resolver = make_resolver(clock)
    with pytest.raises(InvalidKey) as info:
        await resolver.resolve("k")
    assert info.value.reason == "expired_key"


async def test_a_cached_key_is_refused_once_it_expires(make_gateway: GatewayFactory) -> None:
    clock = Clock()
    gw = await make_gateway(clock=clock)
    gw.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    gw.tower.keys["good-key-1"]["expires_at"] = clock.now + 1.5
    response = await gw.client.get("/x", headers=GOOD)
    assert response.status == 200
    clock.advance(1.6)
    response = await gw.client.get("/x", headers=GOOD)
    assert response.status == 401
    assert (await response.json())["error"] == "expired_key"
    assert len(gw.upstream.seen) == 1


async def test_negative_ttl_is_honoured(make_gateway: GatewayFactory) -> None:
    clock = Clock()
    h = await make_gateway(clock=clock, cache={"negative_ttl": 30})
    for _ in range(3):
        response = await h.client.get("/x", headers={"X-API-Key": "late-key"})
        assert response.status == 401
    assert h.tower.calls == ["late-key"]
    h.tower.add("late-key", key_id="k5", user_id="u5", role="operator")
    clock.advance(29)
    assert (await h.client.get("/x", headers={"X-API-Key": "late-key"})).status == 401
    clock.advance(1.5)
    assert (await h.client.get("/x", headers={"X-API-Key": "late-key"})).status == 200
    assert h.tower.calls == ["late-key", "late-key"]


async def test_negative_ttl_zero_caches_no_refusals(
    make_resolver: ResolverFactory, fake_tower: FakeTower
) -> None:
    resolver = make_resolver(negative_ttl=0)
    for _ in range(2):
        with pytest.raises(InvalidKey):
            await resolver.resolve("bad")
    assert fake_tower.calls == ["bad", "bad"]


async def test_valid_answer_replaces_a_refusal(
    make_resolver: ResolverFactory, fake_tower: FakeTower
) -> None:
    clock = Clock()
    resolver = make_resolver(clock, negative_ttl=5)
    with pytest.raises(InvalidKey):
        await resolver.resolve("k")
    fake_tower.add("k", key_id="k1", user_id="u1", role="operator")
    clock.advance(6)
    assert (await resolver.resolve("k")).source == "tower"
    assert resolver.entry_counts() == (1, 0)


# --------------------------------------------------------------------------- bounds


async def test_max_entries_bounds_the_cache(
    make_resolver: ResolverFactory, fake_tower: FakeTower
) -> None:
    for i in range(6):
        fake_tower.add(f"k{i}", key_id=f"id{i}", user_id=f"u{i}", role="operator")
    resolver = make_resolver(max_entries=3)
    for i in range(6):
        await resolver.resolve(f"k{i}")
    assert resolver.entry_counts()[0] == 3
    assert resolver.stats.evictions == 3
    # The least recently used went first.
    assert (await resolver.resolve("k5")).source == "hit"
    assert (await resolver.resolve("k0")).source == "tower"


async def test_random_key_flood_never_evicts_positive_entries(
    make_resolver: ResolverFactory, fake_tower: FakeTower
) -> None:
    fake_tower.add("a", key_id="ka", user_id="ua", role="operator")
    fake_tower.add("b", key_id="kb", user_id="ub", role="operator")
    resolver = make_resolver(max_entries=3)
    await resolver.resolve("a")
    await resolver.resolve("b")
    for i in range(40):
        with pytest.raises(InvalidKey):
            await resolver.resolve(f"random-{i}")
    positive, negative = resolver.entry_counts()
    assert positive == 2 and negative <= 3
    assert (await resolver.resolve("a")).source == "hit"
    assert (await resolver.resolve("b")).source == "hit"
    assert resolver.stats.evictions == 0


# --------------------------------------------------------------------------- stale-if-error


async def test_stale_identity_is_served_while_the_tower_fails(make_gateway: GatewayFactory) -> None:
    clock = Clock()
    h = await make_gateway(clock=clock, cache={"ttl": 10, "stale_if_error": 20})
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    h.tower.mode = "error500"
    clock.advance(11)  # past ttl, inside the stale window
    response = await h.client.get("/x", headers=GOOD)
    assert response.status == 200
    assert h.gateway.resolver.stats.stale_serves == 1
    clock.advance(18.5)  # 29.5 s after caching: still inside ttl + stale_if_error
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    clock.advance(1)  # 30.5 s: the window is over
    response = await h.client.get("/x", headers=GOOD)
    assert response.status == 503
    assert response.headers.get("Retry-After")
    assert len(h.upstream.seen) == 3


async def test_stale_serving_needs_a_failing_tower(make_gateway: GatewayFactory) -> None:
    clock = Clock()
    # refresh_wait: however loaded the machine, the request waits for the tower's answer.
    h = await make_gateway(
        clock=clock, cache={"ttl": 10, "stale_if_error": 300, "refresh_wait": 5}
    )
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    del h.tower.keys["good-key-1"]  # revoked at the tower
    clock.advance(11)
    response = await h.client.get("/x", headers=GOOD)
    assert response.status == 401  # a working tower's refusal beats the stale entry
    assert h.gateway.resolver.entry_counts()[0] == 0


async def test_stale_is_never_served_past_expires_at(make_gateway: GatewayFactory) -> None:
    clock = Clock()
    h = await make_gateway(clock=clock, cache={"ttl": 10, "stale_if_error": 300})
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator", expires_at=clock.now + 15)
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    h.tower.mode = "error500"
    clock.advance(14)
    assert (await h.client.get("/x", headers=GOOD)).status == 200  # stale, before expiry
    clock.advance(1.5)
    response = await h.client.get("/x", headers=GOOD)
    assert response.status in (401, 503)
    assert len(h.upstream.seen) == 2


async def test_tower_down_without_a_cached_identity_is_503(
    make_resolver: ResolverFactory, fake_tower: FakeTower
) -> None:
    fake_tower.mode = "error500"
    resolver = make_resolver()
    with pytest.raises(TowerUnavailable) as info:
        await resolver.resolve("k")
    assert info.value.headers.get("Retry-After")


# --------------------------------------------------------------------------- policy per request


async def test_policy_is_checked_on_every_request(gw: Harness) -> None:
    for path, status in (
        ("/tools/a", 200),
        ("/admin/a", 403),
        ("/tools/b", 200),
        ("/admin/b", 403),
        ("/x", 200),
    ):
        response = await gw.client.get(path, headers=GOOD)
        assert response.status == status, path
    assert gw.tower.calls == ["good-key-1"]


async def test_invalidate_and_clear(make_resolver: ResolverFactory, fake_tower: FakeTower) -> None:
    fake_tower.add("a", key_id="ka", user_id="ua", role="operator")
    fake_tower.add("a2", key_id="ka", user_id="ua", role="operator")
    fake_tower.add("b", key_id="kb", user_id="ub", role="operator")
    resolver = make_resolver()
    for key in ("a", "a2", "b"):
        await resolver.resolve(key)
    assert len(resolver.invalidate_key_ids(["ka"])) == 2
    assert resolver.invalidate_key_ids(["unknown"]) == set()
    assert (await resolver.resolve("b")).source == "hit"
    assert (await resolver.resolve("a")).source == "tower"
    resolver.clear()
    assert resolver.entry_counts() == (0, 0)
    assert (await resolver.resolve("b")).source == "tower"
