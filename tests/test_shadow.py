"""Shadow mode (`enforce: false`): the decision is made, logged and counted, and the request is
forwarded anyway; without an identity it goes without any JWT, and never with the client's key."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import jwt
from multidict import CIMultiDict

from gateway.ops.accesslog import AccessLog
from tests.conftest import JWT_SECRET, FakeUpstream, GatewayFactory, Harness
from tests.test_audit import audit_events, by_request
from tests.test_ops import sample

SHADOW = "X-Gateway-Shadow-Decision"


async def shadow_gateway(make_gateway: GatewayFactory, upstream: str, sink: io.StringIO) -> Harness:
    routes: list[dict[str, Any]] = [
        {"path": "/shadow", "upstream": upstream, "require": ["admin:write"], "enforce": False},
        {"path": "/", "upstream": upstream, "require": ["admin:write"]},
    ]
    h = await make_gateway(access_log=AccessLog(sink), routes=routes)
    tower = h.tower
    tower.add("operator-key", key_id="k1", user_id="u1", role="operator")
    tower.add("admin-key", key_id="k2", user_id="u2", role="admin")
    tower.add("limited-admin", key_id="k3", user_id="u3", role="admin", rate_limit=1)
    tower.add("old-key", key_id="k4", user_id="u4", role="admin", expires_at=time.time() - 5)
    return h


def claims(token: str | None) -> dict[str, Any]:
    assert token is not None and token.startswith("Bearer ")
    decoded: dict[str, Any] = jwt.decode(
        token.removeprefix("Bearer "), JWT_SECRET, algorithms=["HS256"], audience="internal"
    )
    return decoded


async def test_shadow_mode_forwards_what_it_would_deny(
    make_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    sink = io.StringIO()
    h = await shadow_gateway(make_gateway, fake_upstream.url, sink)
    seen = h.upstream.seen

    async def get(headers: dict[str, str], rid: str) -> None:
        response = await h.client.get("/shadow/x", headers={**headers, "X-Request-Id": rid})
        assert response.status == 200, (rid, await response.text())

    # No identity: forwarded without a JWT and without the client's credentials.
    for rid, headers, reason in (
        ("none", {}, "missing_key"),
        ("invalid", {"Authorization": "Bearer nobody-key"}, "invalid_key"),
        ("expired", {"X-API-Key": "old-key"}, "expired_key"),
    ):
        await get(headers, rid)
        assert seen[-1].header("Authorization") is None, rid
        assert seen[-1].header("X-API-Key") is None, rid
        assert seen[-1].header(SHADOW) == f"deny; reason={reason}", rid

    # An identity the policy refuses: forwarded with its JWT, which says what it may do.
    await get({"X-API-Key": "operator-key"}, "forbidden")
    token = claims(seen[-1].header("Authorization"))
    assert token["sub"] == "u1" and "admin:write" not in token["caps"]
    assert seen[-1].header(SHADOW) == "deny; reason=missing_capability"
    assert seen[-1].header("X-API-Key") is None
    await get({"X-API-Key": "limited-admin"}, "limited-ok")
    assert seen[-1].header(SHADOW) is None
    await get({"X-API-Key": "limited-admin"}, "limited")
    assert seen[-1].header(SHADOW) == "deny; reason=rate_limited"
    assert claims(seen[-1].header("Authorization"))["sub"] == "u3"

    # Allowed: no shadow header, and a client cannot forge one.
    await get({"X-API-Key": "admin-key", SHADOW: "allow"}, "allowed")
    assert seen[-1].header(SHADOW) is None
    assert claims(seen[-1].header("Authorization"))["sub"] == "u2"

    text = await h.metrics()
    for reason in ("missing_key", "invalid_key", "expired_key", "missing_capability"):
        assert sample(text, "tower_gateway_would_deny_total", route="shadow", outcome=reason) == 1
        assert sample(text, "tower_gateway_auth_total", outcome=reason) == 1
    assert sample(text, "tower_gateway_would_deny_total", route="shadow", outcome="rate_limited")
    assert sample(text, "tower_gateway_requests_total", route="shadow", status="200") == 7
    assert sample(text, "tower_gateway_rate_limited_total") == 0  # nothing was refused
    assert sample(text, "tower_gateway_auth_total", outcome="success") == 2

    events = by_request(await audit_events(h))
    for rid in ("none", "invalid", "expired", "forbidden", "limited"):
        assert (events[rid]["decision"], events[rid]["outcome"]) == ("would_deny", "failure")
    assert events["forbidden"]["missing_capability"] == "admin:write"
    assert events["allowed"]["decision"] == "allow"

    h.gateway.access_log.close()
    access = {line["request_id"]: line for line in map(json.loads, sink.getvalue().splitlines())}
    assert (access["invalid"]["decision"], access["invalid"]["reason"]) == (
        "would_deny",
        "invalid_key",
    )
    assert access["invalid"]["status"] == 200
    assert access["allowed"]["decision"] == "allow"
    for key in ("nobody-key", "operator-key", "old-key"):
        assert key not in sink.getvalue()


async def test_shadow_mode_still_refuses_malformed_requests_and_tower_outages(
    make_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    h = await shadow_gateway(make_gateway, fake_upstream.url, io.StringIO())
    conflicting = CIMultiDict([("X-API-Key", "admin-key"), ("Authorization", "Bearer other")])
    response = await h.client.get("/shadow/x", headers=conflicting)
    assert response.status == 400
    assert (await response.json())["error"] == "conflicting_keys"
    h.tower.mode = "error500"
    response = await h.client.get("/shadow/x", headers={"X-API-Key": "unseen-key"})
    assert response.status == 503
    assert h.upstream.seen == []
    text = await h.metrics()
    assert (
        sample(text, "tower_gateway_would_deny_total", route="shadow", outcome="conflicting_keys")
        is None
    )


async def test_enforced_routes_still_deny(
    make_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    h = await shadow_gateway(make_gateway, fake_upstream.url, io.StringIO())
    assert (await h.client.get("/x")).status == 401
    assert (await h.client.get("/x", headers={"X-API-Key": "nobody-key"})).status == 401
    response = await h.client.get("/x", headers={"X-API-Key": "operator-key"})
    assert response.status == 403
    assert (await h.client.get("/x", headers={"X-API-Key": "admin-key"})).status == 200
    assert len(h.upstream.seen) == 1
    text = await h.metrics()
    assert (
        sample(text, "tower_gateway_would_deny_total", route="root", outcome="invalid_key") is None
    )
