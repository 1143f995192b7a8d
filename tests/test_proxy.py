"""Forwarding: what the upstream gets, streaming both ways, and how upstream faults surface."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import ClientPayloadError, ClientResponse, web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.http.answers import request_id
from tests.conftest import FakeUpstream, GatewayFactory, Harness, RawHandler
from tests.security.conftest import exchange, request_bytes

ServerFactory = Callable[..., Awaitable[TestServer]]
GOOD = {"X-API-Key": "good-key-1"}
ADMIN = {"X-API-Key": "admin-key-1"}


async def error_body(response: ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body: dict[str, Any] = await response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    assert response.headers.get("X-Request-Id")
    return body


# --------------------------------------------------------------------------- special upstreams


@dataclass
class Special:
    """An upstream with handlers for the cases the shared fake does not cover."""

    first_bytes: asyncio.Event = field(default_factory=asyncio.Event)
    received: int = 0
    digest: str = ""
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_post("/upload", self._upload)
        app.router.add_get("/hop", self._hop)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/truncate", self._truncate)
        return app

    async def _upload(self, request: web.Request) -> web.Response:
        sha = hashlib.sha256()
        async for chunk in request.content.iter_any():
            sha.update(chunk)
            self.received += len(chunk)
            self.first_bytes.set()
        self.digest = sha.hexdigest()
        return web.json_response({"size": self.received, "sha256": self.digest})

    async def _hop(self, _request: web.Request) -> web.Response:
        return web.Response(
            text="ok",
            headers={
                "Keep-Alive": "timeout=5, max=100",
                "Proxy-Authenticate": "Basic realm=x",
                "Connection": "X-Hop-A, x-hop-b",
                "X-Hop-A": "1",
                "X-Hop-B": "2",
                "X-End-To-End": "kept",
                "Set-Cookie": "s=1; Path=/",
            },
        )

    async def _redirect(self, _request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async def _truncate(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return response


@pytest.fixture
async def special(aiohttp_server: ServerFactory) -> Special:
    upstream = Special()
    server = await aiohttp_server(upstream.app(), host="127.0.0.1")
    upstream.url = str(server.make_url("")).rstrip("/")
    return upstream


@pytest.fixture
async def special_gw(make_gateway: GatewayFactory, special: Special) -> Harness:
    h = await make_gateway(
        routes=[
            {"path": "/", "upstream": special.url},
        ]
    )
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    return h


# --------------------------------------------------------------------------- unchanged


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_method_path_query_and_body_unchanged(gw: Harness, method: str) -> None:
    body = b"\x00\x01 binary \xff body" * 100
    response = await gw.client.request(
        method,
        "/api/items/42?b=2&a=1&a=%20x&empty=",
        headers=GOOD,
        data=body if method not in ("GET", "OPTIONS") else None,
    )
    assert response.status == 200
    seen = gw.upstream.seen[-1]
    assert seen.method == method
    assert seen.path == "/api/items/42?b=2&a=1&a=%20x&empty="
    if method not in ("GET", "OPTIONS"):
        assert seen.body_sha256 == hashlib.sha256(body).hexdigest()
        assert seen.body_size == len(body)


async def test_upstream_response_is_passed_through(gw: Harness) -> None:
    response = await gw.client.get("/echo", headers=GOOD)
    assert response.status == 200
    assert response.headers["X-Upstream"] == "fake"
    assert response.headers["Content-Type"].startswith("application/json")
    body = await response.json()
    assert body["path"] == "/echo"
    assert int(response.headers["Content-Length"]) == len(await response.read())


async def test_head_request(gw: Harness) -> None:
    response = await gw.client.head("/echo", headers=GOOD)
    assert response.status == 200
    assert await response.read() == b""


async def test_large_upload_arrives_byte_exact(gw: Harness) -> None:
    body = os.urandom(24 * 1024 * 1024)
    response = await gw.client.post("/upload", data=io.BytesIO(body), headers=GOOD)
    assert response.status == 200
    echoed = await response.json()
    assert echoed["size"] == len(body)
    assert echoed["sha256"] == hashlib.sha256(body).hexdigest()


async def test_upload_is_streamed_not_buffered(special_gw: Harness, special: Special) -> None:
    """The upstream sees the first bytes while the client is still sending."""
    chunk = os.urandom(1024 * 1024)
    sent_before_upstream_saw_bytes: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        yield chunk
        try:
            await asyncio.wait_for(special.first_bytes.wait(), 5)
            sent_before_upstream_saw_bytes.append(True)
        except TimeoutError:
            sent_before_upstream_saw_bytes.append(False)
        for _ in range(23):
            yield chunk

    response = await special_gw.client.post("/upload", data=body(), headers=GOOD)
    assert response.status == 200
    assert sent_before_upstream_saw_bytes == [True]
    assert special.received == 24 * len(chunk)


async def test_streamed_response_reaches_the_client_chunk_by_chunk(gw: Harness) -> None:
    started = time.monotonic()
    response = await gw.client.get("/stream?n=3&gap=0.3", headers=GOOD)
    assert response.status == 200
    first = await response.content.readline()
    first_at = time.monotonic() - started
    rest = await response.read()
    done_at = time.monotonic() - started
    assert first == b"chunk-0\n"
    assert rest == b"chunk-1\nchunk-2\n"
    # Buffered, the first chunk would come with the last, after ~0.9 s.
    assert first_at < 0.45, first_at
    assert done_at - first_at > 0.45, (first_at, done_at)


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_the_upstream_gets_no_header_the_client_did_not_send(
    gw: Harness, method: str
) -> None:
    body = b"raw bytes" if method == "POST" else b""
    result = await exchange(
        gw.client.port,
        request_bytes("/plain", ("X-API-Key", "good-key-1"), method=method, body=body),
        first_reply=True,
    )
    assert result.replies[0].status == 200
    seen = gw.upstream.seen[-1]
    for added_by_http_clients in ("accept", "accept-encoding", "user-agent", "content-type"):
        assert added_by_http_clients not in seen.headers
    assert seen.body_size == len(body)


async def test_content_negotiation_headers_pass_unchanged(gw: Harness) -> None:
    sent = {
        "Accept": "application/xml;q=0.9",
        "Accept-Encoding": "identity",
        "User-Agent": "legacy-client/1.0",
        "Content-Type": "text/csv",
    }
    response = await gw.client.post("/plain", data=b"a,b", headers={**GOOD, **sent})
    assert response.status == 200
    seen = gw.upstream.seen[-1]
    for name, value in sent.items():
        assert seen.headers[name.lower()] == [value]


async def test_hop_by_hop_request_headers_are_dropped(gw: Harness) -> None:
    response = await gw.client.get(
        "/x",
        headers={
            **GOOD,
            "Connection": "keep-alive, X-Custom-Hop",
            "X-Custom-Hop": "secret-hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic cHJveHk6cGFzcw==",
            "Proxy-Connection": "keep-alive",
            "Trailer": "X-Foo",
            "X-End-To-End": "kept",
        },
    )
    assert response.status == 200
    seen = gw.upstream.seen[-1]
    for name in (
        "x-custom-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "trailer",
    ):
        assert seen.header(name) is None, name
    assert "x-custom-hop" not in (seen.header("connection") or "").lower()
    assert seen.header("x-end-to-end") == "kept"


async def test_hop_by_hop_response_headers_are_dropped(special_gw: Harness) -> None:
    response = await special_gw.client.get("/hop", headers=GOOD)
    assert response.status == 200
    for name in ("Keep-Alive", "Proxy-Authenticate", "X-Hop-A", "X-Hop-B"):
        assert name not in response.headers, name
    assert response.headers["X-End-To-End"] == "kept"
    assert response.headers["Set-Cookie"].startswith("s=1")
    assert "hop" not in response.headers.get("Connection", "").lower()


async def test_fake_upstream_connection_named_header_is_dropped(gw: Harness) -> None:
    response = await gw.client.get("/x", headers=GOOD)
    assert response.headers["X-Upstream"] == "fake"
    assert "X-Secret-Hop" not in response.headers


async def test_forged_identity_and_forwarding_headers_are_replaced(gw: Harness) -> None:
    forged = CIMultiDict(
        [
            ("Authorization", "Bearer good-key-1"),
            ("X-Forwarded-User", "root"),
            ("X-Forwarded-Email", "root@example.com"),
            ("X-Gateway-Role", "admin"),
            ("X-Gateway-User", "root"),
            ("X-Auth-Request-User", "root"),
            ("X-Tower-Key-Id", "k2"),
            ("X-Remote-User", "root"),
            ("X_Forwarded_User", "root"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Port", "443"),
            ("X_Forwarded_For", "7.7.7.7"),
            ("X-Real-IP", "6.6.6.6"),
            ("Forwarded", "for=6.6.6.6;proto=https"),
        ]
    )
    response = await gw.client.get("/x", headers=forged)
    assert response.status == 200
    seen = gw.upstream.seen[-1]
    for name in (
        "x-forwarded-user",
        "x-forwarded-email",
        "x-gateway-role",
        "x-gateway-user",
        "x-auth-request-user",
        "x-tower-key-id",
        "x-remote-user",
        "x_forwarded_user",
        "x-forwarded-port",
        "x_forwarded_for",
        "x-real-ip",
        "forwarded",
        "x-api-key",
    ):
        assert seen.header(name) is None, name
    assert seen.headers["x-forwarded-for"] == ["127.0.0.1"]
    assert seen.headers["x-forwarded-proto"] == ["http"]
    assert seen.headers["x-forwarded-host"] == [f"127.0.0.1:{gw.client.port}"]
    (auth,) = seen.headers["authorization"]
    assert auth.startswith("Bearer ey") and "good-key-1" not in auth
    assert len(seen.headers["x-request-id"]) == 1
    assert all(
        "root" not in v and "6.6.6.6" not in v and "7.7.7.7" not in v
        for values in seen.headers.values()
        for v in values
    )


async def test_forwarded_for_chain_is_kept_only_from_trusted_proxies(
    make_gateway: GatewayFactory,
) -> None:
    trusted = await make_gateway(server={"trusted_proxies": ["127.0.0.0/8"]})
    await trusted.client.get("/public/x", headers={"X-Forwarded-For": "203.0.113.7"})
    assert trusted.upstream.seen[-1].headers["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    await trusted.client.get("/public/x")
    assert trusted.upstream.seen[-1].headers["x-forwarded-for"] == ["127.0.0.1"]
    other = await make_gateway(server={"trusted_proxies": ["10.0.0.0/8"]})
    await other.client.get("/public/x", headers={"X-Forwarded-For": "203.0.113.7"})
    assert other.upstream.seen[-1].headers["x-forwarded-for"] == ["127.0.0.1"]


async def test_forged_headers_are_dropped_on_public_routes_too(gw: Harness) -> None:
    response = await gw.client.get(
        "/public/x",
        headers={
            "X-Forwarded-User": "root",
            "X-Gateway-Role": "admin",
            "X-Forwarded-For": "6.6.6.6",
            "Authorization": "Bearer eyJforged.jwt.value",
        },
    )
    assert response.status == 200
    seen = gw.upstream.seen[-1]
    assert seen.header("x-forwarded-user") is None
    assert seen.header("x-gateway-role") is None
    assert seen.header("authorization") is None
    assert seen.headers["x-forwarded-for"] == ["127.0.0.1"]


async def test_upstream_gets_its_own_host(gw: Harness, make_gateway: GatewayFactory) -> None:
    await gw.client.get("/x", headers={**GOOD, "Host": "public.example"})
    upstream_host = gw.upstream.url.removeprefix("http://")
    assert gw.upstream.seen[-1].header("host") == upstream_host
    assert gw.upstream.seen[-1].header("x-forwarded-host") == "public.example"
    h = await make_gateway(
        routes=[{"path": "/", "upstream": gw.upstream.url, "preserve_host": True, "auth": False}]
    )
    await h.client.get("/x", headers={"Host": "public.example"})
    assert h.upstream.seen[-1].header("host") == "public.example"


# --------------------------------------------------------------------------- request ids


@pytest.mark.parametrize("rid", ["abc-123", "A.b_C-9", "x" * 128])
async def test_valid_request_id_is_kept(gw: Harness, rid: str) -> None:
    response = await gw.client.get("/x", headers={**GOOD, "X-Request-Id": rid})
    assert response.headers["X-Request-Id"] == rid
    assert gw.upstream.seen[-1].headers["x-request-id"] == [rid]
    response = await gw.client.get("/x", headers={"X-Request-Id": rid})
    assert response.status == 401
    assert response.headers["X-Request-Id"] == rid


@pytest.mark.parametrize("rid", ["x" * 129, "has space", "semi;colon", "new\tline", "", "ü"])
async def test_invalid_request_id_is_replaced(gw: Harness, rid: str) -> None:
    response = await gw.client.get("/x", headers={**GOOD, "X-Request-Id": rid})
    assert response.status == 200
    new = response.headers["X-Request-Id"]
    assert new != rid and request_id(new) == new
    assert gw.upstream.seen[-1].headers["x-request-id"] == [new]


async def test_request_ids_are_fresh_per_request(gw: Harness) -> None:
    a = (await gw.client.get("/x", headers=GOOD)).headers["X-Request-Id"]
    b = (await gw.client.get("/x", headers=GOOD)).headers["X-Request-Id"]
    assert a != b and request_id(a) == a


async def test_upstream_request_id_does_not_override(special_gw: Harness) -> None:
    response = await special_gw.client.get("/hop", headers={**GOOD, "X-Request-Id": "mine"})
    assert response.headers.getall("X-Request-Id") == ["mine"]


# --------------------------------------------------------------------------- upstream faults


async def test_refused_upstream_is_502(make_gateway: GatewayFactory, unused_tcp_port: int) -> None:
    h = await make_gateway(
        routes=[{"path": "/", "upstream": f"http://127.0.0.1:{unused_tcp_port}"}]
    )
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    response = await h.client.get("/x", headers=GOOD)
    await error_body(response, 502, "upstream_unavailable")


@pytest.mark.parametrize("behaviour", ["close", "garbage", "half"])
async def test_broken_upstream_is_502(
    make_gateway: GatewayFactory,
    raw_server: Callable[[RawHandler], Awaitable[str]],
    behaviour: str,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if behaviour == "garbage":
            writer.write(b"this is not HTTP at all\r\n\r\n")
        elif behaviour == "half":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-")
        await writer.drain()
        writer.close()

    url = await raw_server(handler)
    h = await make_gateway(routes=[{"path": "/", "upstream": url}])
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    response = await h.client.get("/x", headers=GOOD)
    await error_body(response, 502, "upstream_unavailable")


async def test_slow_upstream_is_504(gw: Harness) -> None:
    started = time.monotonic()
    response = await gw.client.get("/slow/sleep?s=1.5", headers=GOOD)
    elapsed = time.monotonic() - started
    body = await error_body(response, 504, "upstream_timeout")
    assert "0.5" in body["detail"]
    assert 0.4 < elapsed < 1.2
    assert gw.upstream.seen and gw.upstream.seen[-1].path == "/slow/sleep?s=1.5"


async def test_slow_upload_is_not_a_slow_upstream(
    make_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    h = await make_gateway(
        routes=[{"path": "/", "upstream": fake_upstream.url, "timeout": 0.5, "auth": False}]
    )

    async def trickle(pause: float) -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"x" * 1000
            await asyncio.sleep(pause)

    # 1.25 s to send, never 0.5 s without a byte: the upstream answers at once after.
    response = await h.client.post("/up", data=trickle(0.25))
    assert response.status == 200
    assert (await response.json())["size"] == 5000

    async def stall() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await asyncio.sleep(1.0)
        yield b"y"

    response = await h.client.post("/up", data=stall())
    await error_body(response, 504, "upstream_timeout")


async def test_truncated_upstream_body_cuts_the_client_off(special_gw: Harness) -> None:
    response = await special_gw.client.get("/truncate", headers=GOOD)
    assert response.status == 200
    with pytest.raises(ClientPayloadError):
        await asyncio.wait_for(response.read(), 5)


async def test_upstream_redirect_is_passed_back_not_followed(special_gw: Harness) -> None:
    response = await special_gw.client.get("/redirect", headers=GOOD, allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == "/elsewhere"


async def test_body_over_max_body_size_is_413(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(server={"max_body_size": 1000})
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    response = await h.client.post("/x", data=b"x" * 1001, headers=GOOD)
    await error_body(response, 413, "body_too_large")
    assert h.upstream.seen == []
    response = await h.client.post("/x", data=b"x" * 1000, headers=GOOD)
    assert response.status == 200

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * 400

    response = await h.client.post("/x", data=chunked(), headers=GOOD)
    assert response.status == 413
    assert all(s.body_size <= 1000 for s in h.upstream.seen)


# --------------------------------------------------------------------------- every error


async def test_every_error_is_json_with_a_request_id(
    make_gateway: GatewayFactory, fake_upstream: FakeUpstream, unused_tcp_port: int
) -> None:
    h = await make_gateway(
        routes=[
            {"path": "/dead", "upstream": f"http://127.0.0.1:{unused_tcp_port}"},
            {"path": "/admin", "upstream": "http://127.0.0.1:9", "require": ["admin:write"]},
            {"path": "/slow", "upstream": fake_upstream.url, "timeout": 0.3},
            {"path": "/api", "upstream": fake_upstream.url},
        ]
    )
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator", rate_limit=2)
    cases: list[tuple[Callable[[], Awaitable[ClientResponse]], int, str]] = [
        (lambda: h.client.get("/api/x", headers={"X-API-Key": "a b"}), 400, "malformed_key"),
        (lambda: h.client.get("/api/x"), 401, "missing_key"),
        (lambda: h.client.get("/api/x", headers={"X-API-Key": "nope"}), 401, "invalid_key"),
        (lambda: h.client.get("/admin/x", headers=GOOD), 403, "missing_capability"),
        (lambda: h.client.get("/nothing", headers=GOOD), 404, "no_route"),
        (lambda: h.client.get("/api/x", headers=GOOD), 200, ""),
        (lambda: h.client.get("/api/x", headers=GOOD), 200, ""),
        (lambda: h.client.get("/api/x", headers=GOOD), 429, "rate_limited"),
    ]
    for send, status, code in cases:
        response = await send()
        if status == 200:
            assert response.status == 200
            continue
        await error_body(response, status, code)
        if status == 401:
            assert response.headers.get("WWW-Authenticate")
        if status == 429:
            assert int(response.headers["Retry-After"]) >= 1

    h.tower.add("other-key", key_id="k2", user_id="u2", role="operator")
    await error_body(
        await h.client.get("/dead/x", headers={"X-API-Key": "other-key"}),
        502,
        "upstream_unavailable",
    )
    await error_body(
        await h.client.get("/slow/sleep?s=1", headers={"X-API-Key": "other-key"}),
        504,
        "upstream_timeout",
    )
    h.tower.mode = "error500"
    response = await h.client.get("/api/x", headers={"X-API-Key": "third-key"})
    await error_body(response, 503, "tower_unavailable")
    assert response.headers.get("Retry-After")
