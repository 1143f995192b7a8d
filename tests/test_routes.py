"""Route matching on the normalised path, and the path the upstream receives."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import ClientResponse
from yarl import URL

from gateway.auth.routes import RouteTable, normalise_path
from gateway.config import RouteConfig
from gateway.errors import BadRequest, NotFound
from tests.conftest import GatewayFactory, Harness

GOOD = {"X-API-Key": "good-key-1"}
ADMIN = {"X-API-Key": "admin-key-1"}


async def raw_get(
    h: Harness, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> ClientResponse:
    """Send `path` exactly as written: no client-side normalisation or re-quoting."""
    url = URL(str(h.client.make_url("")).rstrip("/") + path, encoded=True)
    return await h.client.session.request(method, url, headers=headers or {})


async def raw_http(h: Harness, target: str) -> tuple[int, bytes]:
    """One request over a bare socket, for request targets no client library sends."""
    assert h.client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", h.client.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# --------------------------------------------------------------------------- normalise_path


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/", "/"),
        ("/api/v1/items", "/api/v1/items"),
        ("/public/../admin", "/admin"),
        ("/public/./x/../../admin/", "/admin/"),
        ("//admin", "/admin"),
        ("/a//b///c", "/a/b/c"),
        ("/public/%2e%2e/admin", "/admin"),
        ("/public/%2E%2e/admin", "/admin"),
        ("/public/.%2E/admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/a%2Fb", "/a%2Fb"),
        ("/a%2fb", "/a%2Fb"),
        ("/a%2f..%2fb", "/a%2F..%2Fb"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/a/%20b", "/a/%20b"),
        ("/admin;jsessionid=1/x", "/admin;jsessionid=1/x"),
    ],
)
def test_normalise_path(raw: str, normal: str) -> None:
    assert normalise_path(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "/..",
        "/../admin",
        "/a/../../admin",
        "/%2e%2e/admin",
        "//..//admin",
        "/a/..;x/b",
        "/a%00b",
        "/a%zz",
        "/a%2",
        "/a\\b",
        "relative",
        "/a b",
    ],
)
def test_normalise_path_refuses(raw: str) -> None:
    with pytest.raises(BadRequest) as info:
        normalise_path(raw)
    assert info.value.reason == "bad_path"


def test_route_table_first_prefix_wins_on_segment_boundaries() -> None:
    table = RouteTable(
        [
            RouteConfig(path="/admin", upstream="http://a", name="admin"),
            RouteConfig(path="/api", upstream="http://b", name="api_get", methods=("GET",)),
            RouteConfig(path="/api", upstream="http://c", name="api_other"),
            RouteConfig(path="/", upstream="http://d", name="root"),
        ]
    )
    assert table.match("/admin", "GET").name == "admin"
    assert table.match("/admin/x", "GET").name == "admin"
    assert table.match("/administrator", "GET").name == "root"
    assert table.match("/admin;x=1/y", "GET").name == "admin"
    assert table.match("/api/x", "GET").name == "api_get"
    assert table.match("/api/x", "POST").name == "api_other"
    assert table.match("/Admin", "GET").name == "root"  # case-sensitive


def test_route_table_without_a_match_is_not_found() -> None:
    table = RouteTable([RouteConfig(path="/api", upstream="http://b", name="api")])
    with pytest.raises(NotFound):
        table.match("/other", "GET")
    with pytest.raises(NotFound):
        table.match("/", "GET")


def test_upstream_base_path_is_prepended() -> None:
    (route,) = RouteTable([RouteConfig(path="/api", upstream="http://h:81/base/", name="a")]).routes
    assert (route.upstream_origin, route.upstream_base, route.upstream_host) == (
        "http://h:81",
        "/base",
        "h:81",
    )


# --------------------------------------------------------------------------- through the gateway


async def test_dot_segments_cannot_reach_admin_through_public(gw: Harness) -> None:
    for path in ("/public/../admin", "/public/%2e%2e/admin", "/public/%2E%2E/admin/x"):
        response = await raw_get(gw, path)
        assert response.status == 401, path  # judged as /admin: auth needed, not public
        response = await raw_get(gw, path, GOOD)
        assert response.status == 403, path  # operator lacks admin:write
        body = await response.json()
        assert body == {
            "error": "missing_capability",
            "detail": "Missing required capability: admin:write",
        }
    assert gw.upstream.seen == []
    response = await raw_get(gw, "/public/../admin", ADMIN)
    assert response.status == 200
    assert gw.upstream.seen[-1].path == "/admin"


async def test_upstream_receives_the_normalised_path(gw: Harness) -> None:
    cases = {
        "//admin": "/admin",
        "/public//x///y": "/public/x/y",
        "/public/a/%2e/b": "/public/a/b",
        "/public/%61bc": "/public/abc",
        "/public/a?x=%2f&y=1": "/public/a?x=%2f&y=1",
    }
    for sent, received in cases.items():
        response = await raw_get(gw, sent, ADMIN)
        assert response.status == 200, sent
        assert gw.upstream.seen[-1].path == received, sent


async def test_double_slash_request_target_is_routed_as_a_path(gw: Harness) -> None:
    status, _ = await raw_http(gw, "//admin")
    assert status == 401
    assert gw.upstream.seen == []


async def test_climbing_above_root_is_400(gw: Harness) -> None:
    for path in ("/../admin", "/public/../../admin", "/%2e%2e/x"):
        response = await raw_get(gw, path, ADMIN)
        assert response.status == 400, path
        body = await response.json()
        assert body["error"] == "bad_path"
        assert response.headers.get("X-Request-Id")
    assert gw.tower.calls == []
    assert gw.upstream.seen == []


async def test_params_cannot_dodge_a_route(gw: Harness) -> None:
    for path in ("/admin;x=1", "/admin;/x", "/admin;.css", "/tools;v=2/run"):
        response = await raw_get(gw, path, {"X-API-Key": "good-key-1"} if "tools" in path else {})
        if "tools" in path:
            assert response.status == 200, path  # operator has execute:*
        else:
            assert response.status == 401, path
    response = await raw_get(gw, "/admin;x=1", GOOD)
    assert response.status == 403
    # The upstream gets the parameters as sent.
    response = await raw_get(gw, "/admin;x=1/y", ADMIN)
    assert response.status == 200
    assert gw.upstream.seen[-1].path == "/admin;x=1/y"


async def test_routes_are_case_sensitive(gw: Harness) -> None:
    response = await raw_get(gw, "/PUBLIC/x")
    assert response.status == 401  # `/PUBLIC` is not the public route
    assert gw.upstream.seen == []


async def test_no_matching_route_is_404(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(routes=[{"path": "/api", "upstream": "http://127.0.0.1:9"}])
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    for path in ("/", "/apiv2", "/other/api"):
        response = await h.client.get(path, headers=GOOD)
        assert response.status == 404, path
        body: dict[str, Any] = await response.json()
        assert body["error"] == "no_route" and set(body) == {"error", "detail"}
        assert response.headers.get("X-Request-Id")
    assert h.tower.calls == []


async def test_method_restricted_route(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(
        routes=[
            {"path": "/ro", "upstream": "http://127.0.0.1:9", "methods": ["GET"], "auth": False}
        ]
    )
    response = await h.client.post("/ro/x")
    assert response.status == 404


async def test_public_route_neither_validates_nor_forwards_credentials(gw: Harness) -> None:
    for headers in (
        {"X-API-Key": "good-key-1"},
        {"Authorization": "Bearer good-key-1"},
        {"X-API-Key": "unknown-key"},
        {"X-API-Key": "a", "Authorization": "Bearer b"},
    ):
        response = await gw.client.get("/public/page", headers=headers)
        assert response.status == 200, headers
        seen = gw.upstream.seen[-1]
        assert seen.header("x-api-key") is None
        assert seen.header("authorization") is None
    assert gw.tower.calls == []


async def test_upstream_base_path_is_used(make_gateway: GatewayFactory, gw: Harness) -> None:
    h = await make_gateway(
        routes=[{"path": "/v1", "upstream": gw.upstream.url + "/base", "auth": False}]
    )
    response = await h.client.get("/v1/items?q=1")
    assert response.status == 200
    assert h.upstream.seen[-1].path == "/base/v1/items?q=1"


@pytest.mark.parametrize("target", ["http://evil.example/admin", "*", "admin"])
async def test_request_target_that_is_not_a_path_is_400(gw: Harness, target: str) -> None:
    status, body = await raw_http(gw, target)
    assert status == 400
    if target.startswith("http"):
        # `*` and `admin` are refused by the HTTP parser itself, before the gateway.
        assert b'"bad_path"' in body
    assert gw.upstream.seen == []
    assert gw.tower.calls == []
