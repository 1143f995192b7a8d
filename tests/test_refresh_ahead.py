"""Refresh ahead and serve while refreshing: a known key never waits for the tower.

The cache's clock is injected (entries' fresh and stale bounds move by hand); the tower
is the loopback fake, held with its `gate` or told to hang. Only `cache.refresh_wait`
and the tower budget run on real time.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.errors import ConfigError
from tests.conftest import GatewayFactory, Harness, gateway_config, until
from tests.test_identity import Clock

GOOD = {"X-API-Key": "good-key-1"}
# A request served from the cache; under load on a shared machine, still far below the
# tower's 1 s timeout (the `gateway_config` default in tests) that a waiting request costs.
QUICK = 0.5


async def cached(make_gateway: GatewayFactory, clock: Clock, **cache: float) -> Harness:
    h = await make_gateway(
        clock=clock,
        cache={"ttl": 10, "stale_if_error": 300, "refresh_ahead": 0.2, **cache},
        rate_limit={"default_per_minute": 0},
    )
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator", team="blue")
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    assert h.tower.calls == ["good-key-1"]
    return h


async def timed_get(h: Harness) -> tuple[int, float]:
    started = time.perf_counter()
    response = await h.client.get("/x", headers=GOOD)
    return response.status, time.perf_counter() - started


def stats(h: Harness) -> dict[str, int]:
    return h.gateway.resolver.snapshot()


# --------------------------------------------------------------------------- refresh ahead


async def test_an_entry_in_use_is_refreshed_in_the_background_before_it_expires(
    make_gateway: GatewayFactory,
) -> None:
    clock = Clock()
    h = await cached(make_gateway, clock)
    clock.advance(7.9)  # before the last fifth of its 10 s: nothing to do
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    assert h.tower.calls == ["good-key-1"]
    clock.advance(0.2)  # 8.1 s: in the refresh window
    h.tower.gate = asyncio.Event()  # the refresh is held at the tower
    for _ in range(5):
        status, elapsed = await timed_get(h)
        assert status == 200 and elapsed < QUICK
    await until(lambda: len(h.tower.calls) == 2, what="one background refresh")
    h.tower.gate.set()
    await until(lambda: not h.gateway.resolver._inflight, what="the refresh to land")
    assert stats(h)["refreshes"] == 1 and stats(h)["tower_waits"] == 1  # the first request only
    clock.advance(9.9)  # fresh from the refresh's time, not the first call's
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    assert stats(h)["stale_serves"] == 0


async def test_a_busy_key_costs_about_one_tower_call_per_ttl(make_gateway: GatewayFactory) -> None:
    clock = Clock()
    h = await cached(make_gateway, clock)
    for _ in range(100):  # 50 s, five TTLs, two requests a second
        clock.advance(0.5)
        status, elapsed = await timed_get(h)
        assert status == 200 and elapsed < QUICK
        await until(lambda: not h.gateway.resolver._inflight, what="the refresh to land")
    # A refresh at 80% of each 10 s life: one call per 8 s (the first call, then 6).
    assert 5 <= len(h.tower.calls) - 1 <= 7
    assert stats(h)["tower_waits"] == 1
    assert stats(h)["stale_serves"] == 0


async def test_refresh_ahead_zero_refreshes_only_stale_entries(
    make_gateway: GatewayFactory,
) -> None:
    clock = Clock()
    h = await cached(make_gateway, clock, refresh_ahead=0, refresh_wait=5)
    clock.advance(9.9)
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    assert h.tower.calls == ["good-key-1"]
    clock.advance(0.2)  # stale, idle, a working tower: the request waits for its answer
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    assert h.tower.calls == ["good-key-1"] * 2
    assert stats(h)["tower_waits"] == 2


async def test_an_entry_its_expiry_ends_is_not_refreshed_ahead(
    make_gateway: GatewayFactory,
) -> None:
    clock = Clock()
    h = await make_gateway(clock=clock, cache={"ttl": 300, "refresh_ahead": 0.5})
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator", expires_at=clock.now + 10)
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    clock.advance(9)  # in the last half of its 10 s, but a refresh cannot extend it
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    assert h.tower.calls == ["good-key-1"] and stats(h)["refreshes"] == 0


# --------------------------------------------------------------------------- a hanging tower


async def test_a_hanging_tower_never_slows_a_key_in_use(make_gateway: GatewayFactory) -> None:
    clock = Clock()
    h = await cached(make_gateway, clock)
    h.tower.mode = "hang"
    latencies = []
    for _ in range(40):  # 20 s: past ttl, through refreshes that time out (1 s budget)
        clock.advance(0.5)
        status, elapsed = await timed_get(h)
        assert status == 200
        latencies.append(elapsed)
    assert max(latencies) < QUICK
    assert stats(h)["tower_waits"] == 1  # the first request, before the tower hung
    assert stats(h)["stale_serves"] > 0
    # One refresh in flight at a time, retried at most once a second of the cache's clock.
    assert h.gateway.resolver.stats.refreshes <= 20


async def test_an_idle_stale_key_waits_at_most_refresh_wait_for_a_hanging_tower(
    make_gateway: GatewayFactory,
) -> None:
    clock = Clock()
    h = await cached(make_gateway, clock, refresh_wait=0.2)
    other = {"X-API-Key": "good-key-2"}
    h.tower.add("good-key-2", key_id="k2", user_id="u2", role="operator")
    assert (await h.client.get("/x", headers=other)).status == 200
    h.tower.mode = "hang"
    clock.advance(11)  # both stale, with no refresh in flight: nobody used them in their window
    status, elapsed = await timed_get(h)
    assert status == 200
    assert 0.2 <= elapsed < 0.2 + QUICK  # refresh_wait, not the tower's 1 s
    assert stats(h)["tower_waits"] == 3 and stats(h)["stale_serves"] == 1
    status, elapsed = await timed_get(h)  # the refresh still hangs: served at once
    assert status == 200 and elapsed < QUICK
    # The other idle key: the tower just proved slow, so it waits for nothing either.
    started = time.perf_counter()
    assert (await h.client.get("/x", headers=other)).status == 200
    assert time.perf_counter() - started < 0.2
    assert stats(h)["tower_waits"] == 3 and stats(h)["stale_serves"] == 3
    await until(lambda: len(h.tower.calls) == 4, what="its refresh, in the background")


async def test_stale_is_served_at_once_after_a_tower_fault(make_gateway: GatewayFactory) -> None:
    clock = Clock()
    h = await cached(make_gateway, clock, refresh_wait=5)
    h.tower.add("other-key", key_id="k2", user_id="u2", role="operator")
    h.tower.mode = "error500"
    response = await h.client.get("/x", headers={"X-API-Key": "other-key"})
    assert response.status == 503  # the tower's last call failed
    h.tower.mode = "hang"
    clock.advance(11)
    status, elapsed = await timed_get(h)
    assert status == 200 and elapsed < QUICK  # no refresh_wait: the tower is known to fail
    assert stats(h)["stale_serves"] == 1


async def test_stale_serving_never_passes_expires_at(make_gateway: GatewayFactory) -> None:
    clock = Clock()
    h = await make_gateway(clock=clock, cache={"ttl": 10, "stale_if_error": 300})
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator", expires_at=clock.now + 12)
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    h.tower.gate = asyncio.Event()
    clock.advance(9)
    assert (await h.client.get("/x", headers=GOOD)).status == 200  # refresh started, held
    clock.advance(2.5)
    assert (await h.client.get("/x", headers=GOOD)).status == 200  # stale, refresh in flight
    clock.advance(0.6)  # the key's own expiry: the entry is gone, the tower is asked
    h.tower.gate.set()
    response = await h.client.get("/x", headers=GOOD)
    assert response.status == 401
    assert (await response.json())["error"] == "expired_key"


# --------------------------------------------------------------------------- revocation wins


async def test_a_refusal_from_a_refresh_removes_the_entry_at_once(
    make_gateway: GatewayFactory,
) -> None:
    clock = Clock()
    h = await cached(make_gateway, clock)
    del h.tower.keys["good-key-1"]  # revoked at the tower
    clock.advance(8.5)
    assert (await h.client.get("/x", headers=GOOD)).status == 200  # served; refresh starts
    await until(lambda: h.gateway.resolver.entry_counts()[0] == 0, what="the entry dropped")
    response = await h.client.get("/x", headers=GOOD)  # no clock move: the refusal is cached
    assert response.status == 401
    assert len(h.tower.calls) == 2


async def test_a_refusal_during_the_stale_window_wins_over_the_entry(
    make_gateway: GatewayFactory,
) -> None:
    clock = Clock()
    h = await cached(make_gateway, clock, refresh_wait=5)
    del h.tower.keys["good-key-1"]
    clock.advance(11)  # stale and idle: a tower that answers is waited for
    response = await h.client.get("/x", headers=GOOD)
    assert response.status == 401
    assert h.gateway.resolver.entry_counts()[0] == 0


@pytest.mark.parametrize(
    ("when", "how"),
    [(8.5, "admin"), (11, "admin"), (8.5, "revocation"), (11, "revocation")],
)
async def test_a_drop_during_a_refresh_wins(
    make_gateway: GatewayFactory, when: float, how: str
) -> None:
    clock = Clock()
    h = await cached(make_gateway, clock)
    h.tower.gate = asyncio.Event()
    clock.advance(when)  # in the refresh window, or stale
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    await until(lambda: len(h.tower.calls) == 2, what="the refresh at the tower")
    if how == "admin":
        dropped = await h.ops.delete("/admin/cache/k1", headers=h.admin_headers())
        assert dropped.status == 200
    else:
        assert h.gateway.forget_locally(["k1"]) == 1  # what a revocation from Redis applies
    assert h.gateway.resolver.entry_counts()[0] == 0
    h.tower.gate.set()  # the refresh began before the drop: its answer is not cached
    await until(lambda: not h.gateway.resolver._tasks, what="the refresh to finish")
    assert h.gateway.resolver.entry_counts()[0] == 0


async def test_closing_the_gateway_cancels_a_hanging_refresh(make_gateway: GatewayFactory) -> None:
    clock = Clock()
    h = await cached(make_gateway, clock)
    h.tower.mode = "hang"
    clock.advance(8.5)
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    assert h.gateway.resolver._tasks
    await h.gateway.resolver.close()
    assert not h.gateway.resolver._tasks


@pytest.mark.parametrize(
    ("key", "value"), [("refresh_ahead", 1), ("refresh_ahead", -0.1), ("refresh_wait", -1)]
)
def test_cache_refresh_settings_are_checked(key: str, value: float) -> None:
    with pytest.raises(ConfigError) as info:
        gateway_config("http://127.0.0.1:9999", "http://127.0.0.1:9000", cache={key: value})
    assert info.value.path == f"cache.{key}"
