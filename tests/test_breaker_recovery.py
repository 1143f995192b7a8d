"""A tower that comes back is used again within about a second, without a herd of calls.

Real time on purpose: the breaker's default probe spacing (`tower.breaker_reset`, 0.5 s)
is what is under test, so the gateway runs with its default breaker settings.
"""

from __future__ import annotations

import asyncio
import time

from tests.conftest import GatewayFactory

# Requests for keys the cache has never seen, this often, while the tower is down.
INTERVAL = 0.02


async def test_new_keys_work_within_a_second_of_the_tower_coming_back(
    make_gateway: GatewayFactory,
) -> None:
    h = await make_gateway(rate_limit={"default_per_minute": 0})
    for i in range(200):
        h.tower.add(f"new-key-{i}", key_id=f"k{i}", user_id=f"u{i}", role="operator")
    h.tower.mode = "error500"
    # Retries included, two requests make the five consecutive faults that open the breaker.
    for i in range(3):
        response = await h.client.get("/x", headers={"X-API-Key": f"new-key-{i}"})
        assert response.status == 503
    assert h.gateway.tower.state == "open"

    # Still down for a second and a half: a steady stream of new keys costs the tower at
    # most one probe each half second, never one call per request.
    calls = len(h.tower.calls)
    sent = 0
    started = time.monotonic()
    while time.monotonic() - started < 1.5:
        response = await h.client.get("/x", headers={"X-API-Key": f"new-key-{3 + sent}"})
        assert response.status == 503
        sent += 1
        await asyncio.sleep(INTERVAL)
    probes = len(h.tower.calls) - calls
    assert sent >= 10 and 1 <= probes <= 4

    h.tower.mode = "ok"
    back = time.monotonic()
    index = 3 + sent
    while True:
        response = await h.client.get("/x", headers={"X-API-Key": f"new-key-{index}"})
        index += 1
        if response.status == 200:
            break
        assert response.status == 503
        assert time.monotonic() - back < 1.5, "the tower came back but new keys still fail"
        await asyncio.sleep(INTERVAL)
    assert h.gateway.tower.state == "closed"
    assert time.monotonic() - back < 1.5
