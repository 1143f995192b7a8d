"""Trust boundaries behind the gateway: an attacker who can write to Redis (and read what the
gateway publishes) but holds none of its secrets must not forge, resurrect or revoke an
identity, nor block a key for ever; literal config text must not pull a secret in.

Every Redis test runs against a real redis-server.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry

from gateway.app import Gateway
from gateway.auth.fingerprint import Fingerprinter, derive_secret
from gateway.auth.ratelimit import MemoryRateLimiter
from gateway.auth.ratelimit_exact import RedisRateLimiter
from gateway.config import MIN_FINGERPRINT_SECRET, parse_config, parse_config_text
from gateway.errors import ConfigError
from tests.conftest import ENV, TOWER_API_KEY, GatewayFactory, Harness
from tests.redis_support import RedisServer
from tests.test_config import check_config
from tests.test_replicas import (
    PREFIX,
    cached,
    digest,
    eventually,
    get,
    metric,
    replicas,
    signed,
)
from tests.test_tokens import write_key

pytestmark = pytest.mark.redis

ADMIN_KEY = "admin-key-for-the-fleet"
ATTACKER_KEY = "attacker-chosen-key-01"
COUNTED = 'tower_gateway_redis_errors_total{{op="{}"}}'
NO_FP = {k: v for k, v in ENV.items() if k != "GATEWAY_FINGERPRINT_SECRET"}


def forged_entry(key: bytes, entry_digest: bytes, *, role: str = "admin") -> bytes:
    """A shared entry in the gateway's format, signed with `key`, granting `role`."""
    now_ms = math.floor(time.time() * 1000)
    fresh, fetched = str(now_ms + 600_000).encode(), str(now_ms + 1000).encode()
    answer = {"valid": True, "key_id": "k-forged", "user_id": "root", "role": role}
    body = json.dumps({"stale_until": time.time() + 900, "answer": answer}).encode()
    mac = hmac.new(key, b"|".join((entry_digest, fresh, fetched, body)), hashlib.sha256)
    return b"|".join((fresh, fetched, mac.hexdigest().encode(), body))


def public_guess(jwks: dict[str, Any]) -> bytes:
    """What the gateway once derived its shared secret from: the published key and kid."""
    jwk = dict(jwks["keys"][0])
    material = json.dumps(jwk, sort_keys=True).encode() + jwk["kid"].encode()
    return derive_secret(material, "fingerprint")


# --------------------------------------------------------------------------- 1: the secret


def test_with_redis_the_fingerprint_secret_is_required_and_long() -> None:
    base: dict[str, Any] = {"tower": {"url": "http://127.0.0.1:9"}, "redis": {"url": "redis://r"}}
    with pytest.raises(ConfigError) as missing:
        parse_config(base, env=NO_FP)
    assert missing.value.path == "cache.fingerprint_secret"
    with pytest.raises(ConfigError) as short:
        parse_config({**base, "cache": {"fingerprint_secret": "x" * 31}}, env=NO_FP)
    assert short.value.path == "cache.fingerprint_secret"
    with pytest.raises(ConfigError) as previous:
        parse_config(
            {
                **base,
                "cache": {"fingerprint_secret": "n" * 32, "previous_fingerprint_secrets": ["o"]},
            },
            env=NO_FP,
        )
    assert previous.value.path == "cache.previous_fingerprint_secrets[0]"
    config = parse_config(base, env={**NO_FP, "GATEWAY_FINGERPRINT_SECRET": "e" * 32})
    assert config.cache.fingerprint_secret == "e" * 32 and MIN_FINGERPRINT_SECRET == 32
    # Without Redis nothing is required.
    assert parse_config({"tower": base["tower"]}, env=NO_FP).cache.fingerprint_secret is None


def test_check_config_names_the_missing_fingerprint_secret(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("tower: {url: 'http://127.0.0.1:9'}\nredis: {url: 'redis://127.0.0.1:1'}\n")
    result = check_config(config, NO_FP)
    assert result.returncode == 2
    assert "cache.fingerprint_secret" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
def test_without_a_configured_secret_nothing_public_keys_the_cache(
    tmp_path: Path, algorithm: str
) -> None:
    key_file = write_key(tmp_path, algorithm)
    data = {
        "tower": {"url": "http://127.0.0.1:9"},
        "jwt": {"algorithm": algorithm, "private_key_file": str(key_file)},
    }
    first = Gateway(parse_config(data, env=NO_FP), registry=CollectorRegistry())
    second = Gateway(parse_config(data, env=NO_FP), registry=CollectorRegistry())
    guess = public_guess(first.minter.jwks())
    assert first.fingerprinter.digest(ADMIN_KEY) != _digest_with(guess, ADMIN_KEY)
    # Processes with the same key file still agree (workers, log correlation).
    assert first.fingerprinter.digest(ADMIN_KEY) == second.fingerprinter.digest(ADMIN_KEY)


def _digest_with(secret: bytes, api_key: str) -> bytes:
    return Fingerprinter(secret).digest(api_key)


async def test_a_redis_writer_who_reads_the_jwks_cannot_forge_an_admin(
    make_gateway: GatewayFactory,
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    tmp_path: Path,
) -> None:
    jwt = {"algorithm": "RS256", "private_key_file": str(write_key(tmp_path, "RS256"))}
    a, b = await replicas(make_gateway, redis_server, jwt=jwt)
    a.tower.add(ADMIN_KEY, key_id="k-admin", user_id="root", role="admin")
    jwks = await (await a.ops.get("/.well-known/jwks.json")).json()
    guess = public_guess(jwks)
    shared_guess = derive_secret(guess, "shared-cache")
    # The attacker writes an admin entry for a key of their own under the digest the public
    # material gives, and (knowing more than they can) under the true digest too.
    for where in (_digest_with(guess, ATTACKER_KEY), digest(a, ATTACKER_KEY)):
        await redis_client.set(f"{PREFIX}id:{where.hex()}", forged_entry(shared_guess, where))

    for replica in (a, b):
        response = await replica.client.get("/admin/x", headers={"X-API-Key": ATTACKER_KEY})
        assert response.status == 401
    assert a.tower.calls.count(ATTACKER_KEY) >= 1  # the tower decided, not the entry
    # The first replica read the forgery (and replaced it with the tower's refusal).
    assert metric(await a.metrics(), 'tower_gateway_redis_errors_total{op="decode"}') == 1


async def test_an_entry_breaking_the_tower_field_rules_is_not_read(
    make_gateway: GatewayFactory, redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    a, b = await replicas(make_gateway, redis_server)
    a.tower.add(ADMIN_KEY, key_id="k-admin", user_id="root", role="admin")
    assert a.gateway.replicas is not None
    cache = a.gateway.replicas.cache
    where = digest(a, ADMIN_KEY)
    # Signed as a replica signs (the MAC is not the only check): a role with a control
    # character and an out-of-range expiry are refused as a tower answer would be.
    for answer in (
        {"valid": True, "key_id": "k-admin", "user_id": "root", "role": "admin\n"},
        {
            "valid": True,
            "key_id": "k-admin",
            "user_id": "root",
            "role": "admin",
            "expires_at": 1e13,
        },
    ):
        payload = {"stale_until": time.time() + 600, "answer": answer}
        value = cache._encode(where, time.time() + 300, 1, payload)
        await redis_client.set(f"{PREFIX}id:{where.hex()}", value)
        assert cache._decode(where, value) is None
    assert (await get(b, ADMIN_KEY))[0] == 200
    assert a.tower.calls == [ADMIN_KEY]  # from the tower, not the bad entry


async def test_rotation_accepts_the_previous_secret(
    make_gateway: GatewayFactory, redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    old, new = ENV["GATEWAY_FINGERPRINT_SECRET"], "new-fingerprint-secret-0123456789abcdef"
    a = await make_gateway(redis={"url": redis_server.url})  # still on the old secret
    b = await make_gateway(
        redis={"url": redis_server.url},
        cache={"fingerprint_secret": new, "previous_fingerprint_secrets": [old]},
    )
    await eventually(lambda: all(h.gateway.replicas.bus.connected for h in (a, b)))  # type: ignore[union-attr]
    a.tower.add(ADMIN_KEY, key_id="k1", user_id="u1", role="operator")
    assert (await get(a, ADMIN_KEY))[0] == 200 and (await get(b, ADMIN_KEY))[0] == 200
    # A revocation from either side reaches the other: messages carry both signatures.
    for origin, other in ((b, a), (a, b)):
        assert (await get(other, ADMIN_KEY))[0] == 200
        response = await origin.ops.delete("/admin/cache/k1", headers=origin.admin_headers())
        assert response.status == 200
        await eventually(lambda other=other: not cached(other, ADMIN_KEY))  # type: ignore[misc]
    for h in (a, b):
        assert metric(await h.metrics(), COUNTED.format("revocation_signature")) == 0


# --------------------------------------------------------------------------- 2: revocations


async def test_an_old_signed_entry_written_back_does_not_bring_a_revoked_key_back(
    make_gateway: GatewayFactory, redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    a, b = await replicas(make_gateway, redis_server, cache={"negative_ttl": 0})
    a.tower.add(ADMIN_KEY, key_id="k-admin", user_id="root", role="admin")
    assert (await get(a, ADMIN_KEY))[0] == 200
    name = f"{PREFIX}id:{digest(a, ADMIN_KEY).hex()}"
    genuine = await redis_client.get(name)
    assert genuine is not None

    a.tower.keys[ADMIN_KEY] = {"valid": False, "reason": "revoked"}
    response = await a.ops.delete("/admin/cache/k-admin", headers=a.admin_headers())
    assert response.status == 200
    marker = await redis_client.pttl(f"{PREFIX}revoked:k-admin")
    # The marker outlives every entry signed before it: ttl + stale_if_error at least.
    assert marker > (300 + 300) * 1000

    await redis_client.set(name, genuine)  # no expiry, as an attacker would write it
    assert (await get(a, ADMIN_KEY))[0] == 401
    assert (await get(b, ADMIN_KEY))[0] == 401
    # A replica started after the revocation has only the marker to go by.
    c = await make_gateway(redis={"url": redis_server.url}, cache={"negative_ttl": 0})
    await redis_client.set(name, genuine)
    assert (await get(c, ADMIN_KEY))[0] == 401

    # The marker deleted too: the replicas that heard the revocation remember it.
    await redis_client.delete(f"{PREFIX}revoked:k-admin")
    for replica in (a, b):
        await redis_client.set(name, genuine)
        assert (await get(replica, ADMIN_KEY))[0] == 401


async def hammer(
    harness: Harness, key: str, until: asyncio.Event, seen: list[tuple[float, int]]
) -> None:
    while not until.is_set():
        started = time.monotonic()
        response = await harness.client.get("/data", headers={"X-API-Key": key})
        await response.read()
        seen.append((started, response.status))


@pytest.mark.parametrize("via", ["cache_delete", "webhook"])
async def test_a_revocation_under_load_wins_on_every_replica(
    make_gateway: GatewayFactory, redis_server: RedisServer, via: str
) -> None:
    """The origin busy with the key while it revokes it: repeated, as the race is a race."""
    webhook_secret = "webhook-secret-for-tests-0123"
    a, b = await replicas(
        make_gateway,
        redis_server,
        admin={"webhook_secret": webhook_secret},
        rate_limit={"default_per_minute": 1_000_000},
        credentials={"failed_auth_per_minute": 0},
    )
    for trial in range(8):
        key, key_id = f"busy-key-{trial:04d}", f"k-busy-{trial}"
        a.tower.add(key, key_id=key_id, user_id="u", role="operator")
        stop = asyncio.Event()
        seen_a: list[tuple[float, int]] = []
        seen_b: list[tuple[float, int]] = []
        load = [asyncio.create_task(hammer(a, key, stop, seen_a)) for _ in range(16)]
        load += [asyncio.create_task(hammer(b, key, stop, seen_b)) for _ in range(4)]
        try:
            await eventually(
                lambda a_=seen_a, b_=seen_b: len(a_) > 20 and len(b_) > 5,  # type: ignore[misc]
                timeout=5.0,
            )
            a.tower.keys[key] = {"valid": False, "reason": "revoked"}
            if via == "webhook":
                body = json.dumps({"key_ids": [key_id]}).encode()
                response = await a.ops.post(
                    "/admin/revocations", data=body, headers=signed(body, secret=webhook_secret)
                )
            else:
                response = await a.ops.delete(f"/admin/cache/{key_id}", headers=a.admin_headers())
            assert response.status == 200
            revoked_at = time.monotonic()
            await asyncio.sleep(0.3)  # the load goes on
        finally:
            stop.set()
            await asyncio.gather(*load)
        # The origin refuses every request sent after its answer. The other replica hears
        # the revocation over pub/sub, so it gets until its first refusal (bounded, as the
        # load is bounded), and from then on never accepts the key again.
        late_a = [status for started, status in seen_a if started > revoked_at]
        assert late_a and set(late_a) == {401}, (trial, late_a.count(200))
        late_b = sorted((started, status) for started, status in seen_b if started > revoked_at)
        first_refusal = next((i for i, (_, status) in enumerate(late_b) if status == 401), None)
        assert first_refusal is not None, (trial, "the other replica never refused the key")
        assert late_b[first_refusal][0] - revoked_at < 2.0, trial
        after = [status for _, status in late_b[first_refusal:]]
        assert set(after) == {401}, (trial, after.count(200))
        assert (await get(a, key))[0] == 401 and (await get(b, key))[0] == 401


# --------------------------------------------------------------------------- 3: the channel


async def test_unsigned_or_replayed_revocations_are_ignored_and_counted(
    make_gateway: GatewayFactory, redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    a, b = await replicas(make_gateway, redis_server)
    a.tower.add(ADMIN_KEY, key_id="k1", user_id="u1", role="operator")
    assert (await get(a, ADMIN_KEY))[0] == 200 and (await get(b, ADMIN_KEY))[0] == 200

    channel = f"{PREFIX}revocations"
    # The old, unsigned format, and a signature made with a guessed key.
    await redis_client.publish(channel, json.dumps({"origin": "x", "all": True}))
    body = json.dumps({"origin": "x", "id": "1", "ts": time.time(), "at": 0, "all": True})
    guessed = hmac.new(TOWER_API_KEY.encode(), body.encode(), hashlib.sha256).hexdigest()
    await redis_client.publish(channel, f"{guessed}|{body}")
    counted = COUNTED.format("revocation_signature")
    await eventually(lambda: b.gateway.replicas.bus.rejected == 2)  # type: ignore[union-attr]
    assert cached(b, ADMIN_KEY) and cached(a, ADMIN_KEY)
    assert metric(await b.metrics(), counted) == 2

    # A genuine "drop everything", captured and published again, is applied once.
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(channel)
    await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    response = await a.ops.delete("/admin/cache", headers=a.admin_headers())
    assert response.status == 200
    captured = None
    while captured is None:
        message = await pubsub.get_message(timeout=1.0)
        assert message is not None
        if message["type"] == "message":
            captured = message["data"]
    await pubsub.aclose()
    await eventually(lambda: not cached(b, ADMIN_KEY))
    assert (await get(b, ADMIN_KEY))[0] == 200
    await redis_client.publish(channel, captured)
    await eventually(lambda: b.gateway.replicas.bus.rejected == 3)  # type: ignore[union-attr]
    assert cached(b, ADMIN_KEY)
    assert metric(await b.metrics(), COUNTED.format("revocation_replay")) == 1


# --------------------------------------------------------------------------- 6: rate limits


async def test_a_bucket_pushed_into_the_future_gets_an_expiry(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    limiter = RedisRateLimiter(redis_client, prefix=PREFIX, fallback=MemoryRateLimiter())
    bucket = f"{PREFIX}rl:victim"
    # Microseconds, a year ahead, no expiry: the key would be refused for a year.
    await redis_client.set(bucket, str(int((time.time() + 365 * 86400) * 1e6)))
    per_minute = 600.0  # burst 600, one every 0.1 s
    decision = await limiter.hit("victim", per_minute)
    assert not decision.allowed
    ttl = await redis_client.pttl(bucket)
    assert 0 < ttl <= 60_000  # at most burst intervals: a minute
    assert decision.retry_after <= 0.2
    await asyncio.sleep(decision.retry_after + 0.05)
    assert (await limiter.hit("victim", per_minute)).allowed
    assert 0 < await redis_client.pttl(bucket) <= 60_000


# --------------------------------------------------------------------------- 5: config text


@pytest.mark.parametrize("index", ["0", "1", "99"])
def test_literal_placeholder_text_is_only_text(index: str) -> None:
    name = f"__tower_gateway_env_{index}__"
    text = (
        "tower: {url: 'http://127.0.0.1:9', api_key: '${TOWER_API_KEY}', secret: ${TOWER_SECRET}}\n"
        f"routes:\n  - {{path: /x, upstream: 'http://127.0.0.1:7', name: {name}}}\n"
        "  - {path: /, upstream: 'http://127.0.0.1:7'}\n"
    )
    config = parse_config_text(text, env=ENV)
    assert config.routes[0].name == name
    assert config.tower.api_key == TOWER_API_KEY


def test_check_config_with_a_placeholder_lookalike_exits_0(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "tower: {url: '${TOWER_URL}'}\n"
        "routes:\n  - {path: /, upstream: 'http://127.0.0.1:7', name: __tower_gateway_env_7__}\n"
    )
    result = check_config(config, {**ENV, "TOWER_URL": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
