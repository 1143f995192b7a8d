"""Real nginx and Caddy, started with the generated configs in front of the decision
listener, the fake tower and the fake upstream: what a client and the upstream get."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from tests.conftest import ADMIN_TOKEN, JWT_SECRET, FakeUpstream
from tests.decision.conftest import (
    DataPlane,
    DecisionFactory,
    DecisionHarness,
    start_dataplane,
    ws_echo_upstream,
)

PLANES = ("nginx", "caddy")
ROUTES_WITHOUT_ROOT = [
    {"path": "/public", "auth": False},
    {"path": "/admin", "require": ["admin:write"]},
    {"path": "/tools", "require": ["execute:read_file"]},
    {"path": "/only-get", "methods": ["GET"]},
    {"path": "/api"},
    {"path": "/chat"},
]


def routes(upstream: str) -> list[dict[str, Any]]:
    return [{**r, "upstream": upstream} for r in ROUTES_WITHOUT_ROOT]


Opener = Callable[..., Awaitable[tuple[DecisionHarness, DataPlane]]]


@pytest.fixture
async def open_plane(
    make_decision: DecisionFactory,
    dataplanes: list[DataPlane],
    tmp_path: Path,
    fake_upstream: FakeUpstream,
) -> Opener:
    """`await open_plane(kind, **gateway overrides)`: the decision listener and a real
    nginx or Caddy in front of it (routes without `/` unless given)."""

    async def open_(
        kind: str, *, upstream: str | None = None, **overrides: Any
    ) -> tuple[DecisionHarness, DataPlane]:
        overrides.setdefault("routes", routes(fake_upstream.url))
        h = await make_decision(**overrides)
        plane = await start_dataplane(kind, h, tmp_path / kind, upstream=upstream)
        dataplanes.append(plane)
        return h, plane

    return open_


async def get(
    plane: DataPlane, path: str, method: str = "GET", **kwargs: Any
) -> tuple[int, CIMultiDict[str], bytes, aiohttp.ClientResponse]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.request(method, plane.url + path, allow_redirects=False, **kwargs) as response,
    ):
        body = await response.read()
        return response.status, CIMultiDict(response.headers), body, response


def check_error(
    status: int, headers: CIMultiDict[str], body: bytes, expected: int
) -> dict[str, Any]:
    assert status == expected, body
    assert headers["Content-Type"].startswith("application/json")
    assert headers.get("X-Request-Id")
    assert "X-Tower-Gateway-Error" not in headers
    document: dict[str, Any] = json.loads(body)
    assert set(document) == {"error", "detail"}
    return document


def jwt_claims(value: str | None) -> dict[str, Any]:
    assert value is not None and value.startswith("Bearer ")
    claims: dict[str, Any] = pyjwt.decode(
        value.removeprefix("Bearer "), JWT_SECRET, algorithms=["HS256"], audience="internal"
    )
    return claims


@pytest.mark.parametrize("kind", PLANES)
async def test_allow_forwards_with_jwt_and_without_the_key(open_plane: Opener, kind: str) -> None:
    h, plane = await open_plane(kind)
    status, headers, body, _ = await get(
        plane,
        "/api/items?page=2",
        headers={
            "X-API-Key": "good-key-1",
            "X-Request-Id": "client-rid-1",
            # Spoofed identity: a JWT of its own and headers upstreams trust.
            "X-Internal-Jwt": "Bearer forged",
            "X-User-Id": "admin",
            "X-Forwarded-User": "admin",
            "X-Tower-Gateway-Jwt": "Bearer forged",
            "X-HTTP-Method-Override": "DELETE",
        },
    )
    assert status == 200, body
    assert json.loads(body)["path"] == "/api/items?page=2"
    assert headers["X-Request-Id"] == "client-rid-1"
    assert headers["RateLimit-Limit"] == "100"
    assert int(headers["RateLimit-Remaining"]) <= 99
    seen = h.upstream.seen[-1]
    claims = jwt_claims(seen.header("Authorization"))
    assert claims["sub"] == "u1" and claims["key_id"] == "k1"
    assert len(seen.headers["authorization"]) == 1
    for name in (
        "x-api-key",
        "x-internal-jwt",
        "x-user-id",
        "x-forwarded-user",
        "x-tower-gateway-jwt",
        "x-tower-gateway-decision-token",
        "x-http-method-override",
    ):
        assert name not in seen.headers, name
    assert seen.header("X-Request-Id") == "client-rid-1"
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert "good-key-1" not in json.dumps(seen.headers)


@pytest.mark.parametrize("kind", PLANES)
async def test_a_client_cannot_name_its_own_original_request(open_plane: Opener, kind: str) -> None:
    h, plane = await open_plane(kind)
    forged = {
        "X-API-Key": "good-key-1",  # may call /tools, not /admin
        "X-Original-Method": "GET",
        "X-Original-URI": "/tools/x",
        "X-Forwarded-Method": "GET",
        "X-Forwarded-Uri": "/tools/x",
    }
    status, headers, body, _ = await get(plane, "/admin/x", headers=forged)
    assert check_error(status, headers, body, 403)["error"] == "missing_capability"
    assert h.upstream.seen == []


@pytest.mark.parametrize("kind", PLANES)
async def test_shadow_route_forwards_with_the_would_deny_note(
    open_plane: Opener, kind: str, fake_upstream: FakeUpstream
) -> None:
    shadow = {"path": "/shadow", "upstream": fake_upstream.url, "require": ["admin:write"],
              "enforce": False}  # fmt: skip
    h, plane = await open_plane(kind, routes=[shadow, *routes(fake_upstream.url)])
    status, _, body, _ = await get(
        plane,
        "/shadow/x",
        headers={"X-API-Key": "good-key-1", "X-Gateway-Shadow-Decision": "allow; forged"},
    )
    assert status == 200, body
    seen = h.upstream.seen[-1]
    assert seen.header("X-Gateway-Shadow-Decision") == "deny; reason=missing_capability"
    assert jwt_claims(seen.header("Authorization"))["key_id"] == "k1"
    status, _, body, _ = await get(plane, "/api/x", headers={"X-API-Key": "good-key-1"})
    assert status == 200, body
    assert "x-gateway-shadow-decision" not in h.upstream.seen[-1].headers


@pytest.mark.parametrize("kind", PLANES)
async def test_key_in_authorization_is_replaced_by_the_jwt(open_plane: Opener, kind: str) -> None:
    h, plane = await open_plane(kind)
    status, _, body, _ = await get(plane, "/api/x", headers={"Authorization": "Bearer good-key-1"})
    assert status == 200, body
    seen = h.upstream.seen[-1]
    assert jwt_claims(seen.header("Authorization"))["key_id"] == "k1"
    assert "good-key-1" not in json.dumps(seen.headers)


@pytest.mark.parametrize("kind", PLANES)
async def test_every_denial_reaches_the_client_as_the_proxy_listener_gives_it(
    open_plane: Opener, kind: str
) -> None:
    h, plane = await open_plane(
        kind,
        credentials={"failed_auth_per_minute": 0},
    )
    # 401 without a key: WWW-Authenticate.
    status, headers, body, _ = await get(plane, "/api/x")
    assert check_error(status, headers, body, 401)["error"] == "missing_key"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    # 401 with an unknown key.
    status, headers, body, _ = await get(plane, "/api/x", headers={"X-API-Key": "nope-key-1"})
    check_error(status, headers, body, 401)
    assert headers["WWW-Authenticate"].startswith("Bearer")
    # 403: a capability the key lacks.
    status, headers, body, _ = await get(plane, "/admin/x", headers={"X-API-Key": "good-key-1"})
    doc = check_error(status, headers, body, 403)
    assert doc["detail"] == "Missing required capability: admin:write"
    # 404: no route.
    status, headers, body, _ = await get(plane, "/nowhere", headers={"X-API-Key": "good-key-1"})
    assert check_error(status, headers, body, 404)["error"] == "no_route"
    # 404: the route does not take this method.
    status, headers, body, _ = await get(
        plane, "/only-get/x", method="POST", headers={"X-API-Key": "good-key-1"}
    )
    check_error(status, headers, body, 404)
    # 400: two different keys.
    status, headers, body, _ = await get(
        plane,
        "/api/x",
        headers={"X-API-Key": "good-key-1", "Authorization": "Bearer admin-key-1"},
    )
    check_error(status, headers, body, 400)
    # 400: a key in the query string.
    status, headers, body, _ = await get(plane, "/api/x?api_key=good-key-1")
    assert check_error(status, headers, body, 400)["error"] == "key_in_query"
    assert h.upstream.seen == []
    # None of it was cached: the same key is still allowed where it may go.
    status, _, body, _ = await get(plane, "/api/x", headers={"X-API-Key": "good-key-1"})
    assert status == 200, body


@pytest.mark.parametrize("kind", PLANES)
async def test_rate_limit_429_with_retry_after(open_plane: Opener, kind: str) -> None:
    _, plane = await open_plane(
        kind,
        rate_limit={"default_per_minute": 3},
    )
    statuses = []
    for _ in range(3):
        status, headers, _, _ = await get(plane, "/api/x", headers={"X-API-Key": "good-key-1"})
        statuses.append(status)
    assert statuses == [200, 200, 200]
    status, headers, body, _ = await get(plane, "/api/x", headers={"X-API-Key": "good-key-1"})
    assert check_error(status, headers, body, 429)["error"] == "rate_limited"
    assert int(headers["Retry-After"]) >= 1
    assert headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("kind", PLANES)
async def test_tower_outage_is_503_with_retry_after(open_plane: Opener, kind: str) -> None:
    h, plane = await open_plane(kind)
    h.tower.mode = "error500"
    status, headers, body, _ = await get(plane, "/api/x", headers={"X-API-Key": "good-key-1"})
    check_error(status, headers, body, 503)
    assert int(headers["Retry-After"]) >= 1
    assert h.upstream.seen == []


@pytest.mark.parametrize("kind", PLANES)
async def test_decision_listener_down_fails_closed(open_plane: Opener, kind: str) -> None:
    h, plane = await open_plane(kind)
    await h.decision.close()
    status, _, body, _ = await get(plane, "/api/x", headers={"X-API-Key": "good-key-1"})
    assert status in (502, 503)
    assert json.loads(body)["error"] in ("decision_unavailable", "upstream_unavailable")
    assert h.upstream.seen == []


@pytest.mark.parametrize("kind", PLANES)
async def test_public_route_needs_no_key_and_forwards_none(open_plane: Opener, kind: str) -> None:
    h, plane = await open_plane(kind)
    status, _, body, _ = await get(plane, "/public/page")
    assert status == 200, body
    status, _, body, _ = await get(
        plane,
        "/public/page",
        headers={"Authorization": "Bearer good-key-1", "X-Internal-Jwt": "forged"},
    )
    assert status == 200, body
    seen = h.upstream.seen[-1]
    assert "authorization" not in seen.headers
    assert "x-internal-jwt" not in seen.headers
    assert h.tower.calls == []


@pytest.mark.parametrize("kind", PLANES)
async def test_body_upload_streams_through(open_plane: Opener, kind: str) -> None:
    h, plane = await open_plane(kind)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    status, _, body, _ = await get(
        plane,
        "/api/upload",
        method="POST",
        data=io.BytesIO(payload),
        headers={"X-API-Key": "good-key-1"},
    )
    assert status == 200, body
    answer = json.loads(body)
    assert answer["size"] == len(payload)
    assert answer["sha256"] == hashlib.sha256(payload).hexdigest()
    assert h.upstream.seen[-1].method == "POST"


@pytest.mark.parametrize("kind", PLANES)
async def test_body_over_max_body_size_is_the_proxy_listeners_413(
    open_plane: Opener, kind: str
) -> None:
    h, plane = await open_plane(kind, server={"max_body_size": 1000})
    status, headers, body, _ = await get(
        plane,
        "/api/upload",
        method="POST",
        data=b"x" * 5000,
        headers={"X-API-Key": "good-key-1"},
    )
    assert status == 413, body
    document = json.loads(body)
    assert document == {
        "error": "body_too_large",
        "detail": "request body larger than 1000 bytes",
    }
    assert headers["Content-Type"].startswith("application/json")
    assert h.upstream.seen == []


async def revoke(h: DecisionHarness, key: str, key_id: str) -> None:
    h.tower.keys.pop(key)
    response = await h.ops.delete(
        f"/admin/cache/{key_id}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert response.status == 200


@pytest.mark.parametrize("kind", PLANES)
async def test_revoked_key_stops_at_once_without_decision_caching(
    open_plane: Opener, kind: str
) -> None:
    h, plane = await open_plane(kind)
    assert (await get(plane, "/api/x", headers={"X-API-Key": "good-key-1"}))[0] == 200
    await revoke(h, "good-key-1", "k1")
    assert (await get(plane, "/api/x", headers={"X-API-Key": "good-key-1"}))[0] == 401


async def test_nginx_cache_revoked_key_stops_within_cache_ttl(open_plane: Opener) -> None:
    h, plane = await open_plane(
        "nginx",
        decision={"cache_ttl": 2},
    )
    key = {"X-API-Key": "good-key-1"}
    assert (await get(plane, "/api/x", headers=key))[0] == 200
    decided = len(h.tower.calls)
    assert (await get(plane, "/api/x", headers=key))[0] == 200
    # Answered from nginx's cache: the cached answer's JWT still reaches the upstream.
    assert jwt_claims(h.upstream.seen[-1].header("Authorization"))["key_id"] == "k1"
    assert len(h.upstream.seen) == 2
    revoked_at = time.monotonic()
    await revoke(h, "good-key-1", "k1")
    while True:
        asked_at = time.monotonic()
        if (await get(plane, "/api/x", headers=key))[0] != 200:
            break
        # nginx counts whole seconds: cache_ttl 2 may last until the third second ends.
        assert asked_at - revoked_at < 3.5, "a cached allow outlived cache_ttl"
        await asyncio.sleep(0.1)
    assert (await get(plane, "/api/x", headers=key))[0] == 401
    assert decided == 1
    # The cache holds credentials in its files: owner-only.
    cache_dir = plane.directory / "tower_gateway_cache"
    assert cache_dir.is_dir()
    assert stat.S_IMODE(cache_dir.stat().st_mode) & 0o077 == 0


async def test_nginx_cached_allow_is_never_reused_for_another_key_method_or_route(
    open_plane: Opener,
) -> None:
    h, plane = await open_plane(
        "nginx",
        decision={"cache_ttl": 30},
    )
    admin, operator = {"X-API-Key": "admin-key-1"}, {"X-API-Key": "good-key-1"}
    assert (await get(plane, "/admin/x", headers=admin))[0] == 200
    assert (await get(plane, "/admin/x", headers=admin))[0] == 200  # from the cache
    # Another key on the same route and method.
    assert (await get(plane, "/admin/x", headers=operator))[0] == 403
    assert (await get(plane, "/admin/x", headers={"Authorization": "Bearer good-key-1"}))[0] == 403
    # Another method on a GET-only route.
    assert (await get(plane, "/only-get/x", headers=operator))[0] == 200
    assert (await get(plane, "/only-get/x", method="POST", headers=operator))[0] == 404
    # Another route for a key allowed on the first.
    assert (await get(plane, "/api/y", headers=operator))[0] == 200
    assert (await get(plane, "/admin/y", headers=operator))[0] == 403
    # Each request still carries its own request id, not the cached answer's.
    _, first, _, _ = await get(plane, "/api/y", headers=operator)
    _, second, _, _ = await get(plane, "/api/y", headers=operator)
    assert first["X-Request-Id"] != second["X-Request-Id"]
    text = await h.metrics()
    assert 'tower_gateway_decisions_total{outcome="allow",route="admin"} 1.0' in text


@pytest.mark.parametrize("kind", PLANES)
async def test_websocket_upgrade_with_header_auth(
    open_plane: Opener, kind: str, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    ws_url, seen = await ws_echo_upstream(aiohttp_server)
    _, plane = await open_plane(kind, routes=routes(ws_url), upstream=ws_url)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(plane.url + "/chat/room", headers={"X-API-Key": "good-key-1"}) as ws,
    ):
        await ws.send_str("hello")
        message = await ws.receive(timeout=5)
        assert message.data == "echo:hello"
    assert jwt_claims(seen[-1].get("Authorization"))["key_id"] == "k1"
    assert "X-API-Key" not in seen[-1]
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(plane.url + "/chat/room")
        assert refused.value.status == 401
