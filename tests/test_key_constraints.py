"""What a key's tower record restricts (CONTRACT section 11): client addresses, origins, quotas
and whose requests share the limits, every way in, with the fake tower sending the metadata."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import WSServerHandshakeError

from gateway.auth.quota import MemoryQuota, period_window
from gateway.http.headers import SHADOW_DECISION
from gateway.tower import parse_answer
from gateway.tower.constraints import NO_CONSTRAINTS, Constraints, Quota, parse_constraints
from tests.conftest import ADMIN_TOKEN, FakeTower, GatewayFactory, Harness, tower_record
from tests.decision.conftest import DecisionFactory, make_decision
from tests.decision.test_listener import ask
from tests.redis_support import RedisServer
from tests.test_explain import run_cli
from tests.test_replica_processes import two_replicas
from tests.test_replicas import replicas
from tests.test_workers import StartGroup, start_group

__all__ = ["make_decision", "start_group"]  # the fixtures of the decision and worker tests

KEY = "constrained-key"
PROXY = {"server": {"trusted_proxies": ["127.0.0.1/32"]}}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


async def call(
    h: Harness, key: str = KEY, path: str = "/data", **headers: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    response = await h.client.get(path, headers={"X-API-Key": key, **headers})
    return response.status, await response.json(), dict(response.headers)


# --------------------------------------------------------------------------- reading the record


def constraints(**metadata: Any) -> Constraints:
    identity = parse_answer(200, tower_record("k", "u", "operator", **metadata))
    assert not isinstance(identity, type(None))
    return identity.constraints  # type: ignore[union-attr]


def test_a_record_without_restrictions_shares_one_empty_set() -> None:
    assert constraints(team="blue", rate_limit=5) is NO_CONSTRAINTS
    assert not NO_CONSTRAINTS.restricted


def test_ip_lists_match_addresses_and_blocks_of_both_families() -> None:
    ips = constraints(allowed_ips=["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1"]).ips
    assert ips is not None
    for address in ("10.1.2.3", "192.0.2.7", "2001:db8::42", "::1", "::ffff:10.9.9.9"):
        assert ips.allows(address), address
    for address in ("11.0.0.1", "192.0.2.8", "2001:db9::1", "::2", None, "not-an-ip"):
        assert not ips.allows(address), address


@pytest.mark.parametrize(
    "metadata",
    [
        {"allowed_ips": "10.0.0.0/8"},
        {"allowed_ips": ["10.0.0.1/8"]},  # host bits set: a typo, not a block
        {"allowed_ips": ["10.0.0.0/33"]},
        {"allowed_ips": [" 10.0.0.1"]},
        {"allowed_ips": [7]},
        {"allowed_origins": ["app.example.com"]},
        {"allowed_origins": ["https://app.example.com/path"]},
        {"allowed_origins": {}},
        {"quota": {"limit": 0, "period": "day"}},
        {"quota": {"limit": True, "period": "day"}},
        {"quota": {"limit": 10, "period": "week"}},
        {"quota": 10},
        {"rate_limit_scope": "everyone"},
    ],
)
def test_a_malformed_member_makes_the_key_unusable_never_unrestricted(
    metadata: dict[str, Any],
) -> None:
    parsed = parse_constraints(metadata)
    assert parsed.malformed and parsed.restricted
    assert parsed.ips is None and parsed.quota is None


def test_well_formed_members_are_read() -> None:
    parsed = constraints(
        allowed_origins=["HTTPS://App.Example.com/"],
        quota={"limit": 3, "period": "month"},
        rate_limit_scope="team",
    )
    assert parsed.origins == frozenset({"https://app.example.com"})
    assert parsed.quota == Quota(3, "month") and parsed.scope == "team"
    assert parsed.malformed is None


def test_periods_end_at_utc_midnight_and_the_first_of_the_month() -> None:
    assert period_window("day", at("2026-12-07T23:59:59")) == ("2026-12-07", at("2026-12-08"))
    assert period_window("month", at("2026-12-31T12:00:00")) == ("2026-12", at("2027-01-01"))
    assert period_window("month", at("2026-02-10T00:00:00")) == ("2026-02", at("2026-03-01"))


# --------------------------------------------------------------------------- addresses, origins


async def test_a_key_works_only_from_its_addresses_behind_a_trusted_proxy(
    make_gateway: GatewayFactory,
) -> None:
    h = await make_gateway(**PROXY)
    h.tower.add(KEY, key_id="k1", user_id="u1", role="operator", allowed_ips=["203.0.113.0/24"])
    assert (await call(h, **{"X-Forwarded-For": "203.0.113.9"}))[0] == 200
    status, body, _ = await call(h, **{"X-Forwarded-For": "198.51.100.1"})
    assert (status, body["error"]) == (403, "ip_not_allowed")
    status, body, _ = await call(h)  # the proxy's own address: not in the list
    assert (status, body["error"]) == (403, "ip_not_allowed")
    assert len(h.tower.calls) == 1  # the refusal is the key's record, cached with it


async def test_ipv6_clients_are_checked_too(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(**PROXY)
    h.tower.add(KEY, key_id="k1", user_id="u1", role="operator", allowed_ips=["2001:db8::/48"])
    assert (await call(h, **{"X-Forwarded-For": "2001:db8:0:1::5"}))[0] == 200
    assert (await call(h, **{"X-Forwarded-For": "2001:db8:1::5"}))[1]["error"] == "ip_not_allowed"


async def test_browser_requests_only_from_the_keys_origins(gw: Harness) -> None:
    gw.tower.add(
        KEY, key_id="k1", user_id="u1", role="operator", allowed_origins=["https://app.example"]
    )
    assert (await call(gw, Origin="https://app.example"))[0] == 200
    assert (await call(gw, Origin="HTTPS://APP.EXAMPLE"))[0] == 200
    assert (await call(gw))[0] == 200  # no Origin: not a browser, nothing to check
    status, body, _ = await call(gw, Origin="https://evil.example")
    assert (status, body["error"]) == (403, "origin_not_allowed")


async def test_a_websocket_upgrade_from_another_origin_is_refused(gw: Harness) -> None:
    gw.tower.add(
        KEY, key_id="k1", user_id="u1", role="operator", allowed_origins=["https://app.example"]
    )
    with pytest.raises(WSServerHandshakeError) as refused:
        await gw.client.ws_connect(
            "/chat", headers={"X-API-Key": KEY, "Origin": "https://evil.example"}
        )
    assert refused.value.status == 403


async def test_a_malformed_record_refuses_the_key_counts_and_logs_its_fingerprint(
    gw: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    gw.tower.add(KEY, key_id="k1", user_id="u1", role="operator", allowed_ips=["not-a-cidr"])
    with caplog.at_level(logging.WARNING, logger="gateway.auth.constraints"):
        for _ in range(3):
            status, body, _ = await call(gw)
            assert (status, body["error"]) == (403, "key_misconfigured")
    logged = [r.getMessage() for r in caplog.records if "restrictions are malformed" in r.message]
    assert len(logged) == 1  # once per tower answer, not once per request
    fingerprint = gw.gateway.engine.fingerprinter
    assert fingerprint.short(fingerprint.digest(KEY)) in logged[0]
    assert KEY not in logged[0] and "not-a-cidr" not in logged[0]
    assert "gateway_malformed_key_constraints_total 1.0" in await gw.metrics()


async def test_a_shadow_route_forwards_an_ip_refusal_as_would_deny(
    make_gateway: GatewayFactory,
) -> None:
    h = await make_gateway(**PROXY)
    h = await make_gateway(
        **PROXY, routes=[{"path": "/", "upstream": h.upstream.url, "enforce": False}]
    )
    h.tower.add(KEY, key_id="k1", user_id="u1", role="operator", allowed_ips=["10.0.0.0/8"])
    status, _, _ = await call(h)
    assert status == 200
    assert h.upstream.seen[-1].header(SHADOW_DECISION) == "deny; reason=ip_not_allowed"


# --------------------------------------------------------------------------- quotas


async def test_a_quota_refuses_with_retry_after_to_the_end_of_the_day(
    make_gateway: GatewayFactory,
) -> None:
    clock = Clock(at("2026-12-07T23:00:00"))
    h = await make_gateway(clock=clock)
    h.tower.add(
        KEY, key_id="k1", user_id="u1", role="operator", quota={"limit": 2, "period": "day"}
    )
    first = await call(h)
    assert first[0] == 200
    assert (first[2]["Quota-Limit"], first[2]["Quota-Remaining"]) == ("2", "1")
    assert first[2]["Quota-Period"] == "day" and first[2]["Quota-Reset"] == "3600"
    assert (await call(h))[0] == 200
    status, body, headers = await call(h)
    assert (status, body["error"]) == (429, "quota_exceeded")
    assert headers["Retry-After"] == "3600" and headers["Quota-Remaining"] == "0"

    clock.now = at("2026-12-08T00:00:01")  # a new day: a new count
    status, _, headers = await call(h)
    assert status == 200 and headers["Quota-Remaining"] == "1"


async def test_a_monthly_quota_lasts_the_calendar_month(make_gateway: GatewayFactory) -> None:
    clock = Clock(at("2026-11-30T10:00:00"))
    h = await make_gateway(clock=clock)
    h.tower.add(
        KEY, key_id="k1", user_id="u1", role="operator", quota={"limit": 1, "period": "month"}
    )
    assert (await call(h))[0] == 200
    clock.now = at("2026-11-30T23:59:00")
    assert (await call(h))[0] == 429
    clock.now = at("2026-12-01T00:00:00")
    assert (await call(h))[0] == 200


def test_the_memory_counter_forgets_past_periods() -> None:
    clock = Clock(at("2026-12-07T12:00:00"))
    counter = MemoryQuota(clock=clock, max_buckets=10)
    quota = Quota(5, "day")
    for i in range(20):
        counter.count(f"b{i}", quota)
    assert len(counter._counts) == 10
    clock.now += 86_400
    for i in range(20, 40):
        counter.count(f"b{i}", quota)
    assert len(counter._counts) == 10
    assert all(label == "2026-12-08" for label, _ in counter._counts.values())
    assert counter.count("b39", quota, add=0).remaining == 3  # two counted, the next is third


@pytest.mark.redis
async def test_a_quota_on_redis_is_shared_by_replicas_and_survives_a_restart(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    clock = Clock(at("2026-12-07T23:59:00"))
    settings: dict[str, Any] = {"rate_limit": {"backend": "redis"}, "clock": clock}
    a, b = await replicas(make_gateway, redis_server, **settings)
    a.tower.add(
        KEY, key_id="k1", user_id="u1", role="operator", quota={"limit": 4, "period": "day"}
    )
    statuses = [(await call(a if i % 2 else b))[0] for i in range(5)]
    assert statuses == [200] * 4 + [429]
    restarted = await make_gateway(redis={"url": redis_server.url}, **settings)
    assert (await call(restarted))[0] == 429
    clock.now = at("2026-12-08T00:00:00")
    assert [(await call(g))[0] for g in (a, b, restarted)] == [200, 200, 200]


@pytest.mark.redis
async def test_a_quota_falls_back_to_local_counts_when_redis_is_down(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    h = await make_gateway(redis={"url": redis_server.url}, rate_limit={"backend": "redis"})
    h.tower.add(
        KEY, key_id="k1", user_id="u1", role="operator", quota={"limit": 2, "period": "day"}
    )
    assert (await call(h))[0] == 200
    redis_server.stop()
    try:
        statuses = [(await call(h))[0] for _ in range(3)]
    finally:
        redis_server.start()
    assert statuses == [200, 200, 429]  # the local count starts afresh, and still holds
    assert "gateway_quota_fallbacks_total 3.0" in await h.metrics()


@pytest.mark.redis
async def test_a_quota_holds_across_two_gateway_processes(
    start_group: StartGroup, redis_server: RedisServer, fake_tower: FakeTower
) -> None:
    first, second = await two_replicas(
        start_group, redis_server.url, rate_limit={"backend": "redis"}
    )
    quota = {"limit": 5, "period": "day"}
    fake_tower.add(KEY, key_id="k5", user_id="u5", role="operator", quota=quota)
    headers = {"X-API-Key": KEY}
    statuses = [
        (await (first if i % 2 else second).get(f"/q/{i}", headers=headers))[0] for i in range(8)
    ]
    assert statuses == [200] * 5 + [429] * 3


# --------------------------------------------------------------------------- shared limits


async def test_a_users_keys_share_one_quota_and_one_rate_limit(gw: Harness) -> None:
    shared = {"user_id": "u7", "role": "operator", "rate_limit_scope": "user"}
    gw.tower.add("user-key-a", key_id="ka", quota={"limit": 3, "period": "day"}, **shared)
    gw.tower.add("user-key-b", key_id="kb", quota={"limit": 3, "period": "day"}, **shared)
    gw.tower.add("other-key", key_id="kc", user_id="u8", role="operator", rate_limit_scope="user")
    statuses = [(await call(gw, k))[0] for k in ("user-key-a", "user-key-b") * 2]
    assert statuses == [200, 200, 200, 429]
    assert (await call(gw, "other-key"))[0] == 200

    limited = {"role": "operator", "team": "red", "rate_limit": 2, "rate_limit_scope": "team"}
    gw.tower.add("team-key-a", key_id="t1", user_id="ua", **limited)
    gw.tower.add("team-key-b", key_id="t2", user_id="ub", **limited)
    statuses = [(await call(gw, k))[0] for k in ("team-key-a", "team-key-b", "team-key-a")]
    assert statuses == [200, 200, 429]


async def test_keys_scoped_by_key_keep_their_own_limits(gw: Harness) -> None:
    gw.tower.add("own-a", key_id="a", user_id="u9", role="operator", rate_limit=1)
    gw.tower.add("own-b", key_id="b", user_id="u9", role="operator", rate_limit=1)
    assert [(await call(gw, k))[0] for k in ("own-a", "own-b", "own-a")] == [200, 200, 429]


# --------------------------------------------------------------------------- explain


async def explain(h: Harness, **body: Any) -> dict[str, Any]:
    response = await h.ops.post("/admin/explain", json=body, headers=h.admin_headers())
    assert response.status == 200, await response.text()
    answer: dict[str, Any] = await response.json()
    return answer


async def test_explain_names_the_constraint_that_decides(gw: Harness) -> None:
    gw.tower.add(
        KEY,
        key_id="k1",
        user_id="u1",
        role="operator",
        allowed_ips=["10.0.0.0/8"],
        allowed_origins=["https://app.example"],
        quota={"limit": 2, "period": "day"},
    )
    ip = await explain(gw, key=KEY, path="/data", client="192.0.2.1")
    assert (ip["reason"], ip["constraint"], ip["status"]) == ("ip_not_allowed", "allowed_ips", 403)
    origin = await explain(gw, key=KEY, path="/data", client="10.0.0.1", origin="https://x.example")
    assert (origin["reason"], origin["constraint"]) == ("origin_not_allowed", "allowed_origins")
    allowed = await explain(gw, key=KEY, path="/data", client="10.0.0.1")
    assert allowed["decision"] == "allow" and allowed["constraint"] is None
    assert allowed["quota"]["remaining"] == 1 and allowed["quota"]["limit"] == 2

    gw.tower.add("quota-key", key_id="k2", user_id="u2", role="operator",
                 quota={"limit": 1, "period": "day"})  # fmt: skip
    assert (await call(gw, "quota-key"))[0] == 200
    spent = await explain(gw, key="quota-key", path="/data")
    assert (spent["reason"], spent["constraint"], spent["status"]) == (
        "quota_exceeded",
        "quota",
        429,
    )
    assert spent["quota"]["remaining"] == 0
    assert (await explain(gw, key="quota-key", path="/data"))["quota"]["remaining"] == 0


async def test_explain_refuses_a_client_that_is_not_an_address(gw: Harness) -> None:
    response = await gw.ops.post(
        "/admin/explain",
        json={"key": KEY, "path": "/x", "client": "somewhere"},
        headers=gw.admin_headers(),
    )
    assert response.status == 400


async def test_the_explain_command_names_the_restriction(
    gw: Harness, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN", raising=False)
    gw.tower.add(
        KEY,
        key_id="k1",
        user_id="u1",
        role="operator",
        allowed_ips=["10.0.0.0/8"],
        quota={"limit": 5, "period": "month"},
    )
    common = ["--ops", str(gw.ops.make_url("")).rstrip("/"), "--admin-token", ADMIN_TOKEN]
    argv = [*common, "--key", KEY, "--path", "/data"]
    assert await run_cli([*argv, "--client", "192.0.2.1"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DENY  GET /data  -> 403 ip_not_allowed")
    assert "decided by   the key's allowed_ips restriction" in out
    assert await run_cli([*argv, "--client", "10.1.1.1", "--origin", "https://a.example"]) == 0
    assert "quota        4 of 5 left this month" in capsys.readouterr().out


@pytest.mark.redis
async def test_restrictions_survive_the_shared_cache_between_replicas(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    a = await make_gateway(redis={"url": redis_server.url}, **PROXY)
    b = await make_gateway(redis={"url": redis_server.url}, **PROXY)
    a.tower.add(KEY, key_id="k1", user_id="u1", role="operator", allowed_ips=["10.0.0.0/8"])
    assert (await call(a, **{"X-Forwarded-For": "10.0.0.1"}))[0] == 200
    status, body, _ = await call(b, **{"X-Forwarded-For": "192.0.2.1"})
    assert (status, body["error"]) == (403, "ip_not_allowed")
    assert (await call(b, **{"X-Forwarded-For": "10.0.0.2"}))[0] == 200
    assert a.tower.calls.count(KEY) == 1  # b read the identity, restrictions and all, from Redis


async def test_the_decision_listener_applies_restrictions_and_counts_usage(
    make_decision: DecisionFactory,
) -> None:
    h = await make_decision(tower={"usage_report": {"interval": 3600}})
    h.tower.add(
        KEY, key_id="k9", user_id="u9", role="operator", allowed_origins=["https://app.example"]
    )
    headers = {"X-API-Key": KEY, "Origin": "https://evil.example"}
    refused = await ask(h, "GET", "/data", **headers)
    assert refused.status == 403
    assert (
        await ask(h, "GET", "/data", **{**headers, "Origin": "https://app.example"})
    ).status == 200
    assert h.gateway.usage is not None
    taken = h.gateway.usage.take()
    assert taken["k9"].statuses == {403: 1, 200: 1}
