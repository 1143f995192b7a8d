"""Replicas sharing one real redis-server: one tower call per key for all of them, a rate limit
enforced across them, revocations that reach every replica, the signed tower webhook, and the
fallback to per-process behaviour while Redis is down (and the recovery after it).

Each test runs two `Gateway`s (two harnesses from `make_gateway`) against the same fake tower,
fake upstream and redis-server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest
import redis.asyncio

from gateway.replicas.webhook import WEBHOOK_MAX_AGE, sign_webhook, verify_webhook
from tests.conftest import ADMIN_TOKEN, GatewayFactory, Harness
from tests.redis_support import RedisServer

PREFIX = "tower-gateway:"
KEY = "replica-key-0001"
WEBHOOK_SECRET = "webhook-secret-for-tests-0123"


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def replicas(
    make_gateway: GatewayFactory, server: RedisServer, **overrides: object
) -> tuple[Harness, Harness]:
    a = await make_gateway(redis={"url": server.url}, **overrides)
    b = await make_gateway(redis={"url": server.url}, **overrides)
    # Subscribed before the test starts: a replica drops its cache when it subscribes.
    await eventually(lambda: connected(a) and connected(b))
    return a, b


def connected(harness: Harness) -> bool:
    replicas = harness.gateway.replicas
    return replicas is not None and replicas.bus.connected


async def get(harness: Harness, key: str, path: str = "/data") -> tuple[int, dict[str, object]]:
    response = await harness.client.get(path, headers={"X-API-Key": key})
    body = await response.json()
    return response.status, body


async def eventually(condition: Callable[[], bool], timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(0.01)


def digest(harness: Harness, key: str) -> bytes:
    return harness.gateway.fingerprinter.digest(key)


def cached(harness: Harness, key: str) -> bool:
    return harness.gateway.resolver.peek(digest(harness, key)) is not None


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def signed(body: bytes, *, at: float | None = None, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    return {
        "Authorization": f"Bearer {ADMIN_TOKEN}",
        "Content-Type": "application/json",
        "X-Signature-Timestamp": timestamp,
        "X-Signature": sign_webhook(secret, timestamp, body),
    }


def test_the_webhook_window_is_300_seconds_each_way() -> None:
    body, now = b'{"key_ids": ["k1"]}', 1_800_000_000.0
    for age, ok in ((0, True), (300, True), (-300, True), (301, False), (-301, False)):
        stamp = str(int(now - age))
        signature = sign_webhook(WEBHOOK_SECRET, stamp, body)
        assert verify_webhook(WEBHOOK_SECRET, stamp, signature, body, now) is ok, age
    assert WEBHOOK_MAX_AGE == 300


# --------------------------------------------------------------------------- the shared cache


async def test_a_key_costs_one_tower_call_for_all_replicas(
    make_gateway: GatewayFactory, redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    a, b = await replicas(make_gateway, redis_server)
    expires_at = time.time() + 60
    a.tower.add(KEY, key_id="k1", user_id="u1", role="operator", expires_at=expires_at)

    assert (await get(a, KEY))[0] == 200
    assert (await get(b, KEY))[0] == 200
    assert (await get(b, KEY))[0] == 200
    assert a.tower.calls == [KEY]
    stats = b.gateway.resolver.stats
    assert (stats.shared_hits, stats.hits, stats.tower_calls) == (1, 1, 0)
    assert metric(await b.metrics(), "tower_gateway_cache_shared_hits_total") == 1

    # Stored under the keyed digest, never the key, and gone by the key's expiry.
    hexdigest = digest(a, KEY).hex()
    names = {n.decode() if isinstance(n, bytes) else n for n in await redis_client.keys("*")}
    assert names == {f"{PREFIX}id:{hexdigest}", f"{PREFIX}kid:k1"}
    value = await redis_client.get(f"{PREFIX}id:{hexdigest}")
    assert value is not None and KEY.encode() not in value
    assert 0 < await redis_client.pttl(f"{PREFIX}id:{hexdigest}") <= 60_000
    assert 0 < await redis_client.pttl(f"{PREFIX}kid:k1") <= 60_000
    assert await redis_client.smembers(f"{PREFIX}kid:k1") == {hexdigest.encode()}


async def test_refusals_are_shared_with_their_reason(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    a, b = await replicas(make_gateway, redis_server)
    a.tower.keys["revoked-key-0001"] = {"valid": False, "reason": "revoked"}

    status_a, body_a = await get(a, "revoked-key-0001")
    status_b, body_b = await get(b, "revoked-key-0001")
    assert (status_a, status_b) == (401, 401)
    assert body_a["detail"] == body_b["detail"] == "API key has been revoked"
    assert len(a.tower.calls) == 1
    assert b.gateway.resolver.stats.shared_hits == 1


async def test_ten_cold_requests_on_two_replicas_make_one_tower_call(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    a, b = await replicas(make_gateway, redis_server)
    a.tower.add(KEY, key_id="k1", user_id="u1", role="operator")
    a.tower.delay = 0.2

    results = await asyncio.gather(*(get(a if i % 2 else b, KEY) for i in range(10)))
    assert [status for status, _ in results] == [200] * 10
    assert a.tower.calls == [KEY]
    calls = a.gateway.resolver.stats.tower_calls + b.gateway.resolver.stats.tower_calls
    shared = a.gateway.resolver.stats.shared_hits + b.gateway.resolver.stats.shared_hits
    assert (calls, shared) == (1, 1)


async def test_a_lock_left_by_a_dead_replica_delays_but_never_hangs(
    make_gateway: GatewayFactory, redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    a, b = await replicas(make_gateway, redis_server)
    a.tower.add(KEY, key_id="k1", user_id="u1", role="operator")
    await redis_client.set(f"{PREFIX}lock:{digest(a, KEY).hex()}", "gone", px=60_000)

    started = time.monotonic()
    assert (await get(a, KEY))[0] == 200
    waited = time.monotonic() - started
    # The lock's own lifetime (tower.timeout 1.0 + margin), then the replica asks itself.
    assert 1.4 <= waited < 3.0
    assert a.tower.calls == [KEY]
    assert (await get(b, KEY))[0] == 200  # and shared what it got
    assert a.tower.calls == [KEY]


async def test_a_forged_or_moved_entry_is_not_trusted(
    make_gateway: GatewayFactory, redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    a, b = await replicas(make_gateway, redis_server)
    a.tower.add("admin-key-0001", key_id="k-admin", user_id="root", role="admin")
    assert (await get(a, "admin-key-0001"))[0] == 200
    admin_entry = await redis_client.get(f"{PREFIX}id:{digest(a, 'admin-key-0001').hex()}")
    assert admin_entry is not None
    # Whoever can write to Redis copies the admin's entry under an unknown key's digest,
    # and writes garbage under another.
    await redis_client.set(f"{PREFIX}id:{digest(a, 'unknown-key-001').hex()}", admin_entry)
    await redis_client.set(f"{PREFIX}id:{digest(a, 'unknown-key-002').hex()}", b"9" * 15 + b"|x")

    assert (await get(b, "unknown-key-001"))[0] == 401
    assert (await get(b, "unknown-key-002"))[0] == 401
    assert b.gateway.resolver.stats.shared_hits == 0
    errors = await b.metrics()
    assert metric(errors, 'tower_gateway_redis_errors_total{op="decode"}') == 2


async def test_a_stale_shared_entry_is_served_while_the_tower_fails(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    clock = FakeClock()
    a, b = await replicas(
        make_gateway, redis_server, clock=clock, cache={"ttl": 10, "stale_if_error": 100}
    )
    a.tower.add(KEY, key_id="k1", user_id="u1", role="operator")
    assert (await get(a, KEY))[0] == 200
    clock.advance(20)
    a.tower.mode = "error500"

    assert (await get(b, KEY))[0] == 200
    assert b.gateway.resolver.stats.stale_serves == 1
    clock.advance(100)
    assert (await get(b, KEY))[0] == 503


# --------------------------------------------------------------------------- rate limits


async def test_a_limit_is_enforced_across_replicas(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    a, b = await replicas(
        make_gateway, redis_server, rate_limit={"backend": "redis", "default_per_minute": 6}
    )
    a.tower.add(KEY, key_id="k1", user_id="u1", role="operator")

    statuses = [(await get(a if i % 2 else b, KEY))[0] for i in range(7)]
    assert statuses == [200] * 6 + [429]


# --------------------------------------------------------------------------- revocation


async def test_an_invalidation_on_one_replica_reaches_the_other(
    make_gateway: GatewayFactory, redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    a, b = await replicas(make_gateway, redis_server)
    a.tower.add(KEY, key_id="k1", user_id="u1", role="operator")
    assert (await get(a, KEY))[0] == 200
    assert (await get(b, KEY))[0] == 200
    assert cached(b, KEY) and len(a.tower.calls) == 1

    response = await a.ops.delete("/admin/cache/k1", headers=a.admin_headers())
    assert response.status == 200
    assert (await response.json())["dropped_entries"] == 1
    assert not cached(a, KEY)
    assert await redis_client.exists(f"{PREFIX}id:{digest(a, KEY).hex()}", f"{PREFIX}kid:k1") == 0
    await eventually(lambda: not cached(b, KEY), timeout=1.0)

    assert (await get(b, KEY))[0] == 200
    assert len(a.tower.calls) == 2


async def test_a_synchronous_invalidation_is_propagated_in_the_background(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    a, b = await replicas(make_gateway, redis_server)
    a.tower.add(KEY, key_id="k1", user_id="u1", role="operator")
    assert (await get(a, KEY))[0] == 200
    assert (await get(b, KEY))[0] == 200

    assert a.gateway.invalidate_key_id("k1") == 1
    await eventually(lambda: not cached(b, KEY), timeout=1.0)
    assert (await get(b, KEY))[0] == 200
    assert len(a.tower.calls) == 2


async def test_an_unreadable_signed_revocation_message_drops_the_cache(
    make_gateway: GatewayFactory, redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    a, b = await replicas(make_gateway, redis_server)
    a.tower.add(KEY, key_id="k1", user_id="u1", role="operator")
    assert (await get(b, KEY))[0] == 200

    # Signed by a replica (so from the fleet) but unreadable: it still revokes something.
    assert a.gateway.replicas is not None
    await redis_client.publish(f"{PREFIX}revocations", a.gateway.replicas.bus.sign(b"\xff no"))
    await eventually(lambda: not cached(b, KEY), timeout=1.0)
    assert (await get(b, KEY))[0] == 200


async def test_clearing_one_replica_clears_all(
    make_gateway: GatewayFactory, redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    a, b = await replicas(make_gateway, redis_server)
    a.tower.add(KEY, key_id="k1", user_id="u1", role="operator")
    assert (await get(a, KEY))[0] == 200
    assert (await get(b, KEY))[0] == 200

    response = await a.ops.delete("/admin/cache", headers=a.admin_headers())
    assert response.status == 200
    assert await redis_client.keys(f"{PREFIX}id:*") == []
    await eventually(lambda: not cached(b, KEY), timeout=1.0)


async def test_the_signed_webhook_revokes_on_every_replica(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    a, b = await replicas(make_gateway, redis_server, admin={"webhook_secret": WEBHOOK_SECRET})
    a.tower.add(KEY, key_id="k1", user_id="u1", role="operator")
    assert (await get(a, KEY))[0] == 200
    assert (await get(b, KEY))[0] == 200
    body = json.dumps({"key_ids": ["k1", "k-unknown"]}).encode()

    refused = [
        {**signed(body), "X-Signature": "sha256=" + "0" * 64},
        signed(body, secret="another-secret-0123456789"),
        # Well outside the window: a loaded machine may take seconds to send these;
        # the exact bounds are pinned by test_the_webhook_window_is_300_seconds_each_way.
        signed(body, at=time.time() - WEBHOOK_MAX_AGE - 30),
        signed(body, at=time.time() + WEBHOOK_MAX_AGE + 30),
        {k: v for k, v in signed(body).items() if k != "X-Signature-Timestamp"},
        {k: v for k, v in signed(body).items() if k != "Authorization"},
    ]
    for headers in refused:
        response = await a.ops.post("/admin/revocations", data=body, headers=headers)
        assert response.status == 401
    assert cached(a, KEY) and cached(b, KEY)

    response = await a.ops.post("/admin/revocations", data=body, headers=signed(body))
    assert response.status == 200
    assert await response.json() == {"revoked": 2, "dropped_entries": 1}
    assert not cached(a, KEY)
    await eventually(lambda: not cached(b, KEY), timeout=1.0)
    assert (await get(b, KEY))[0] == 200
    assert len(a.tower.calls) == 2


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b'["k1"]',
        b"{}",
        b'{"key_ids": "k1"}',
        b'{"key_ids": [1]}',
        b'{"key_ids": [""]}',
        b'{"key_ids": ["bad\\nid"]}',
        json.dumps({"key_ids": ["k" * 257]}).encode(),
        json.dumps({"key_ids": [f"k{i}" for i in range(1001)]}).encode(),
        b"[" * 100_000,
    ],
)
async def test_a_malformed_webhook_body_is_refused(
    make_gateway: GatewayFactory, payload: bytes
) -> None:
    gw = await make_gateway(admin={"webhook_secret": WEBHOOK_SECRET})
    response = await gw.ops.post("/admin/revocations", data=payload, headers=signed(payload))
    assert response.status == 400
    assert (await response.json())["error"] == "bad_request"


async def test_the_webhook_without_redis_revokes_locally(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(admin={"webhook_secret": WEBHOOK_SECRET})
    gw.tower.add(KEY, key_id="k1", user_id="u1", role="operator")
    assert (await get(gw, KEY))[0] == 200
    body = json.dumps({"key_ids": ["k1"]}).encode()
    response = await gw.ops.post("/admin/revocations", data=body, headers=signed(body))
    assert response.status == 200
    assert not cached(gw, KEY)
    assert getattr(gw.gateway, "redis_ok", None) is None


async def test_the_webhook_is_off_without_a_secret(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    body = b'{"key_ids": ["k1"]}'
    response = await gw.ops.post("/admin/revocations", data=body, headers=signed(body))
    assert response.status == 404


# --------------------------------------------------------------------------- outage


async def test_replicas_fall_back_while_redis_is_down_and_resync_after(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    a, b = await replicas(
        make_gateway, redis_server, rate_limit={"backend": "redis", "default_per_minute": 1000}
    )
    for n in (1, 2, 3):
        a.tower.add(f"{KEY}-{n}", key_id=f"k{n}", user_id="u1", role="operator")
    assert (await get(a, f"{KEY}-1"))[0] == 200
    assert (await get(b, f"{KEY}-1"))[0] == 200
    assert b.gateway.replicas is not None
    bus_b = b.gateway.replicas.bus
    resyncs = bus_b.resyncs

    redis_server.stop()
    # Cached keys, new keys (each replica asks the tower itself), limits decided locally.
    for harness in (a, b, a, b):
        assert (await get(harness, f"{KEY}-1"))[0] == 200
        assert (await get(harness, f"{KEY}-2"))[0] == 200
    assert a.tower.calls.count(f"{KEY}-2") == 2
    assert await b.gateway.redis_ok() is False
    text = await b.metrics()
    assert metric(text, "tower_gateway_redis_errors_total") >= 1
    assert metric(text, "tower_gateway_rate_limit_fallbacks_total") >= 1
    await eventually(lambda: not connected(b), timeout=3.0)

    redis_server.start()
    await eventually(lambda: bus_b.resyncs > resyncs and bus_b.connected, timeout=5.0)
    # It may have missed revocations meanwhile: its whole local cache is gone.
    assert not cached(b, f"{KEY}-1") and not cached(b, f"{KEY}-2")
    assert await b.gateway.redis_ok() is True

    await eventually(lambda: connected(a), timeout=5.0)
    assert (await get(a, f"{KEY}-3"))[0] == 200
    assert (await get(b, f"{KEY}-3"))[0] == 200
    assert a.tower.calls.count(f"{KEY}-3") == 1
    assert b.gateway.resolver.stats.shared_hits >= 1
