"""The decision listener on its own: original requests, answers, guards, metrics, audit."""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import jwt as pyjwt
import pytest

from gateway.decision.answer import ERROR_HEADER
from gateway.decision.listener import TOKEN_HEADER
from gateway.ops.accesslog import AccessLog
from gateway.ops.audit import AuditLog
from tests.conftest import JWT_SECRET, FakeUpstream
from tests.decision.conftest import DECISION_TOKEN, DecisionFactory, DecisionHarness

TOKEN = {TOKEN_HEADER: DECISION_TOKEN}


def nginx_style(method: str, uri: str, **headers: str) -> dict[str, str]:
    return {**TOKEN, "X-Original-Method": method, "X-Original-URI": uri, **headers}


async def ask(h: DecisionHarness, method: str, uri: str, **headers: str) -> Any:
    return await h.decision.get("/auth", headers=nginx_style(method, uri, **headers))


async def test_allow_carries_jwt_request_id_rate_headers_and_no_store(
    make_decision: DecisionFactory,
) -> None:
    h = await make_decision()
    response = await ask(h, "GET", "/tools/run?x=1", **{"X-API-Key": "good-key-1"})
    assert response.status == 200
    assert await response.read() == b""
    bearer = response.headers["Authorization"]
    claims = pyjwt.decode(
        bearer.removeprefix("Bearer "), JWT_SECRET, algorithms=["HS256"], audience="internal"
    )
    assert claims["sub"] == "u1" and claims["key_id"] == "k1"
    assert response.headers["X-Request-Id"]
    assert response.headers["RateLimit-Limit"] == "100"
    assert response.headers["Cache-Control"] == "no-store"
    assert "X-Accel-Expires" not in response.headers


async def test_forwarded_headers_as_traefik_and_caddy_send_them(
    make_decision: DecisionFactory,
) -> None:
    h = await make_decision()
    headers = {
        **TOKEN,
        "X-Forwarded-Method": "POST",
        "X-Forwarded-Uri": "/admin/x",
        "X-Forwarded-Host": "api.example",
        "X-Forwarded-Proto": "https",
        "X-API-Key": "good-key-1",
    }
    response = await h.decision.get("/auth", headers=headers)
    assert response.status == 403
    body = await response.json()
    assert body == {
        "error": "missing_capability",
        "detail": "Missing required capability: admin:write",
    }
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("http://evil.example/x", "bad_path"),
        ("/a/../../etc", "bad_path"),
        ("/%2e%2e/x", "bad_path"),
        ("/a/%2E%2E/%2e%2e/x", "bad_path"),
        ("/a/..;x/b", "bad_path"),
        ("/a%zz", "bad_path"),
        ("/x?api_key=good-key-1", "key_in_query"),
    ],
)
async def test_original_uri_is_checked_as_a_request_path(
    make_decision: DecisionFactory, uri: str, reason: str
) -> None:
    h = await make_decision()
    response = await ask(h, "GET", uri, **{"X-API-Key": "good-key-1"})
    assert response.status == 400, uri
    body = await response.json()
    assert body["error"] == reason
    assert response.headers[ERROR_HEADER] == await response.text()
    assert h.tower.calls == []


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 400),
        ({"X-Original-Method": "GET"}, 400),
        ({"X-Original-URI": "/x"}, 400),
        ({"X-Original-Method": "TRACE", "X-Original-URI": "/x"}, 405),
        (
            {
                "X-Original-Method": "GET",
                "X-Original-URI": "/tools/x",
                "X-Forwarded-Method": "GET",
                "X-Forwarded-Uri": "/admin/x",
            },
            400,
        ),
        ({"X-Original-Method": "get", "X-Original-URI": "/x"}, 400),
    ],
)
async def test_no_or_half_an_original_request_is_400(
    make_decision: DecisionFactory, headers: dict[str, str], status: int
) -> None:
    h = await make_decision()
    response = await h.decision.get(
        "/auth", headers={**TOKEN, "X-API-Key": "good-key-1", **headers}
    )
    assert response.status == status
    assert (await response.json())["error"]


async def test_ext_authz_takes_method_and_path_from_the_check_request(
    make_decision: DecisionFactory,
) -> None:
    h = await make_decision()
    allowed = await h.decision.request(
        "POST", "/ext_authz/tools/run?q=1", headers={**TOKEN, "X-API-Key": "good-key-1"}
    )
    assert allowed.status == 200
    assert allowed.headers["Authorization"].startswith("Bearer ")
    denied = await h.decision.request(
        "DELETE", "/ext_authz/admin", headers={**TOKEN, "X-API-Key": "good-key-1"}
    )
    assert denied.status == 403
    missing = await h.decision.get("/ext_authz/", headers=TOKEN)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")


async def test_unknown_endpoint_is_404(make_decision: DecisionFactory) -> None:
    h = await make_decision()
    response = await h.decision.get("/authz", headers=nginx_style("GET", "/"))
    assert response.status == 404


async def test_token_is_required_when_set(make_decision: DecisionFactory) -> None:
    h = await make_decision()
    for headers in ({}, {TOKEN_HEADER: "wrong-token-0123456789"}):
        response = await h.decision.get(
            "/auth",
            headers={
                "X-Original-Method": "GET",
                "X-Original-URI": "/",
                "X-API-Key": "good-key-1",
                **headers,
            },
        )
        assert response.status == 403
        assert (await response.json())["error"] == "decision_forbidden"
        assert DECISION_TOKEN not in await response.text()
    assert h.tower.calls == []


async def test_a_token_that_is_not_utf8_is_a_mismatch(make_decision: DecisionFactory) -> None:
    h = await make_decision()
    reader, writer = await asyncio.open_connection("127.0.0.1", h.decision.port)
    writer.write(
        b"GET /auth HTTP/1.1\r\nHost: x\r\nX-Original-Method: GET\r\nX-Original-URI: /\r\n"
        b"X-Tower-Gateway-Decision-Token: \xff\xfe-not-utf8-0123456789\r\n"
        b"Connection: close\r\n\r\n"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b"decision_forbidden" in answer


@pytest.mark.parametrize(
    "line",
    [
        b"X-Original-URI: /\xff\xfe",
        b"X-Original-Method: G\xffT",
        b"X-API-Key: good-key-\xff",
        b"X-Forwarded-For: \xff",
    ],
)
async def test_non_utf8_header_values_never_crash(
    make_decision: DecisionFactory, line: bytes
) -> None:
    h = await make_decision()
    headers = {
        b"X-Original-URI": b"X-Original-URI: /x",
        b"X-Original-Method": b"X-Original-Method: GET",
        b"X-API-Key": b"X-API-Key: good-key-1",
    }
    headers[line.split(b":")[0]] = line
    reader, writer = await asyncio.open_connection("127.0.0.1", h.decision.port)
    writer.write(
        b"GET /auth HTTP/1.1\r\nHost: x\r\n"
        + b"\r\n".join(headers.values())
        + f"\r\nX-Tower-Gateway-Decision-Token: {DECISION_TOKEN}\r\n".encode()
        + b"Connection: close\r\n\r\n"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status = int(answer.split(b" ", 2)[1])
    assert status in (200, 400, 401), answer[:300]


async def test_peer_allow_list(make_decision: DecisionFactory) -> None:
    h = await make_decision(decision={"token": None, "allow_from": ["10.0.0.0/8"]})
    response = await ask(h, "GET", "/", **{"X-API-Key": "good-key-1"})
    assert response.status == 403
    h2 = await make_decision(decision={"token": None, "allow_from": ["127.0.0.1/32"]})
    response = await ask(h2, "GET", "/", **{"X-API-Key": "good-key-1"})
    assert response.status == 200


async def test_cache_control_is_bounded_by_ttl_key_expiry_and_jwt_life(
    make_decision: DecisionFactory,
) -> None:
    h = await make_decision(decision={"cache_ttl": 30}, jwt={"ttl": 20})
    h.tower.add(
        "short-key-1", key_id="k9", user_id="u9", role="operator", expires_at=time.time() + 8.5
    )
    long = await ask(h, "GET", "/", **{"X-API-Key": "good-key-1"})
    assert long.headers["Cache-Control"] in ("private, max-age=20", "private, max-age=19")
    assert long.headers["X-Accel-Expires"] == long.headers["Cache-Control"].split("=")[1]
    short = await ask(h, "GET", "/", **{"X-API-Key": "short-key-1"})
    assert short.headers["Cache-Control"] in ("private, max-age=8", "private, max-age=7")
    h2 = await make_decision(decision={"cache_ttl": 3})
    capped = await ask(h2, "GET", "/", **{"X-API-Key": "good-key-1"})
    assert capped.headers["Cache-Control"] == "private, max-age=3"
    denied = await ask(h2, "GET", "/", **{"X-API-Key": "nope-key-1"})
    assert denied.status == 401
    assert denied.headers["Cache-Control"] == "no-store"
    assert "X-Accel-Expires" not in denied.headers


async def test_public_route_allows_without_a_key_or_a_jwt(make_decision: DecisionFactory) -> None:
    h = await make_decision()
    response = await ask(h, "GET", "/public/x", Authorization="Bearer whatever-key-123")
    assert response.status == 200
    assert "Authorization" not in response.headers
    assert h.tower.calls == []


async def test_rate_limit_counted_once_per_decision(make_decision: DecisionFactory) -> None:
    h = await make_decision(rate_limit={"default_per_minute": 3})
    statuses = [(await ask(h, "GET", "/", **{"X-API-Key": "good-key-1"})).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    last = await ask(h, "GET", "/", **{"X-API-Key": "good-key-1"})
    assert int(last.headers["Retry-After"]) >= 1
    assert (await last.json())["error"] == "rate_limited"


async def test_failure_throttle_uses_the_forwarded_client_address(
    make_decision: DecisionFactory,
) -> None:
    h = await make_decision(credentials={"failed_auth_per_minute": 2})
    for _ in range(2):
        r = await ask(h, "GET", "/", **{"X-API-Key": "bad-key-123", "X-Forwarded-For": "9.9.9.9"})
        assert r.status == 401
    blocked = await ask(h, "GET", "/", **{"X-API-Key": "good-key-1", "X-Forwarded-For": "9.9.9.9"})
    assert blocked.status == 429
    assert (await blocked.json())["error"] == "too_many_failures"
    # The last entry is the one the data plane appended: a client's own entries are left of it.
    other = await ask(
        h, "GET", "/", **{"X-API-Key": "good-key-1", "X-Forwarded-For": "9.9.9.9, 8.8.8.8"}
    )
    assert other.status == 200


async def test_tower_outage_is_503_with_retry_after(make_decision: DecisionFactory) -> None:
    h = await make_decision()
    h.tower.mode = "error500"
    response = await ask(h, "GET", "/", **{"X-API-Key": "fresh-key-1"})
    assert response.status == 503
    assert response.headers["Retry-After"]
    assert (await response.json())["error"]


async def test_websocket_upgrade_decision(make_decision: DecisionFactory) -> None:
    h = await make_decision(websocket={"allowed_origins": ["https://app.example"]})
    upgrade = {"Upgrade": "websocket", "X-API-Key": "good-key-1"}
    ok = await ask(h, "GET", "/chat", **upgrade, Origin="https://app.example")
    assert ok.status == 200
    bad = await ask(h, "GET", "/chat", **upgrade, Origin="https://evil.example")
    assert bad.status == 403
    assert (await bad.json())["error"] == "origin_not_allowed"


async def test_upgrade_on_a_route_without_websockets_is_refused(
    make_decision: DecisionFactory, fake_upstream: FakeUpstream
) -> None:
    h = await make_decision(
        routes=[{"path": "/", "upstream": fake_upstream.url, "websocket": False}]
    )
    upgrade = await ask(h, "GET", "/chat", Upgrade="websocket", **{"X-API-Key": "good-key-1"})
    assert upgrade.status == 400
    assert (await upgrade.json())["error"] == "websocket_refused"
    plain = await ask(h, "GET", "/chat", **{"X-API-Key": "good-key-1"})
    assert plain.status == 200


async def test_decisions_are_counted_audited_and_logged(
    make_decision: DecisionFactory,
) -> None:
    h = await make_decision()
    access, audit = io.StringIO(), io.StringIO()
    h.gateway.access_log = AccessLog(access)
    h.gateway.audit = AuditLog(AccessLog(audit, name="audit-log"))
    await ask(h, "GET", "/tools/x?page=1", **{"X-API-Key": "good-key-1"})
    await ask(h, "GET", "/admin/x", **{"X-API-Key": "good-key-1"})
    await ask(h, "GET", "/public/x")
    text = await h.metrics()
    assert 'tower_gateway_decisions_total{outcome="allow",route="tools"} 1.0' in text
    assert 'tower_gateway_decisions_total{outcome="deny",route="admin"} 1.0' in text
    assert 'tower_gateway_decisions_total{outcome="public",route="public"} 1.0' in text
    h.gateway.access_log.close()  # joins the writer threads: every line is written
    h.gateway.audit.close()
    logged = [json.loads(line) for line in access.getvalue().splitlines()]
    assert [(e["type"], e["method"], e["path"], e["status"]) for e in logged] == [
        ("decision", "GET", "/tools/x", 200),
        ("decision", "GET", "/admin/x", 403),
        ("decision", "GET", "/public/x", 200),
    ]
    events = [json.loads(line) for line in audit.getvalue().splitlines()]
    assert [(e["decision"], e["path"], e.get("reason")) for e in events] == [
        ("allow", "/tools/x", None),
        ("deny", "/admin/x", "missing_capability"),
    ]
    assert "good-key-1" not in access.getvalue() + audit.getvalue() + text
    assert DECISION_TOKEN not in access.getvalue() + audit.getvalue()


# The same request to the proxy listener and to the decision listener: the same answer.
PARITY: list[tuple[str, str, dict[str, str]]] = [
    ("GET", "/tools/x", {"X-API-Key": "good-key-1"}),
    ("GET", "/admin/x", {"X-API-Key": "good-key-1"}),
    ("GET", "/admin/x", {"X-API-Key": "admin-key-1"}),
    ("GET", "/x", {}),
    ("GET", "/x", {"X-API-Key": "unknown-key-1"}),
    ("GET", "/x", {"X-API-Key": "good-key-1", "Authorization": "Bearer admin-key-1"}),
    ("GET", "/x?apikey=1", {"X-API-Key": "good-key-1"}),
    ("POST", "/public/form", {}),
]


@pytest.mark.parametrize(("method", "uri", "headers"), PARITY)
async def test_decision_equals_the_proxy_listeners(
    make_decision: DecisionFactory, method: str, uri: str, headers: dict[str, str]
) -> None:
    h = await make_decision()
    proxied = await h.proxy.request(method, uri, headers=headers)
    decided = await ask(h, method, uri, **headers)
    if proxied.status == 200:
        assert decided.status == 200
        return
    assert decided.status == proxied.status
    assert await decided.json() == await proxied.json()
    for name in ("WWW-Authenticate", "Retry-After"):
        assert decided.headers.get(name) == proxied.headers.get(name)


@pytest.mark.parametrize(
    "uri",
    ["/\u00e4", "/a b", "/%00", "/a\\\\b", "/" + "a" * 9000, "/%", "/a?%zz", "*", "", "/a#frag"],
)
async def test_odd_original_uris_never_crash(make_decision: DecisionFactory, uri: str) -> None:
    h = await make_decision()
    response = await h.decision.get(
        "/auth",
        headers={**TOKEN, "X-Original-Method": "GET", "X-API-Key": "good-key-1"}
        | {"X-Original-URI": uri.encode("utf-8").decode("latin-1")},
    )
    assert response.status in (200, 400), uri
    if response.status == 400:
        assert (await response.json())["error"] in (
            "bad_path",
            "bad_original_request",
            "malformed_request",  # a header longer than server.max_field_size
        )
