"""WebSocket: authenticated handshakes, first-message auth, key lifetime, and the relay.

A real WebSocket upstream (an aiohttp app on loopback) records every handshake
and message that reaches it, so "never relayed" is checked where it matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType, WSServerHandshakeError, web
from aiohttp.test_utils import TestServer

from tests.conftest import JWT_SECRET, FakeUpstream, GatewayFactory, Harness, until
from tests.test_tracing import CLIENT_SPAN, PARENT, STATE, TRACE
from tests.test_tracing import parts as trace_parts

KEY = {"X-API-Key": "good-key-1"}  # k1 / u1, operator
ADMIN_KEY = {"X-API-Key": "admin-key-1"}  # k2 / u2, admin
UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


@dataclass
class UpstreamHandshake:
    path: str
    headers: dict[str, str]
    protocol: str | None


@dataclass
class WsUpstream:
    """An upstream that echoes; `!close CODE REASON` closes, `!big N` sends N bytes."""

    handshakes: list[UpstreamHandshake] = field(default_factory=list)
    received: list[str | bytes] = field(default_factory=list)
    closes: list[tuple[int, str]] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._socket)
        return app

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(
            protocols=("chat.v2", "chat.v1"), autoclose=False, max_msg_size=16 * 2**20
        )
        await ws.prepare(request)
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.handshakes.append(UpstreamHandshake(request.raw_path, headers, ws.ws_protocol))
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                self.received.append(msg.data)
                if msg.data.startswith("!close "):
                    _, code, reason = msg.data.split(" ", 2)
                    await ws.close(code=int(code), message=reason.encode())
                    return ws
                if msg.data.startswith("!big "):
                    await ws.send_bytes(b"y" * int(msg.data.split(" ", 1)[1]))
                    continue
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                self.received.append(msg.data)
                await ws.send_bytes(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                self.closes.append((msg.data, msg.extra))
                await ws.close(code=msg.data)
                return ws
            else:
                self.closes.append((ws.close_code or 0, ""))
                return ws


@pytest.fixture
async def ws_upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> WsUpstream:
    upstream = WsUpstream()
    server = await aiohttp_server(upstream.app(), host="127.0.0.1")
    upstream.url = str(server.make_url("")).rstrip("/")
    return upstream


WsFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
def make_ws(
    make_gateway: GatewayFactory, ws_upstream: WsUpstream, fake_upstream: FakeUpstream
) -> WsFactory:
    async def factory(**overrides: Any) -> Harness:
        routes = [
            {"path": "/open", "upstream": ws_upstream.url, "auth": False},
            {"path": "/admin", "upstream": ws_upstream.url, "require": ["admin:write"]},
            {"path": "/sleep", "upstream": fake_upstream.url},  # plain HTTP, for the drain
            {"path": "/down", "upstream": "http://127.0.0.1:9"},  # nothing listens there
            {"path": "/", "upstream": ws_upstream.url},
        ]
        harness = await make_gateway(routes=routes, **overrides)
        harness.tower.add(
            "good-key-1", key_id="k1", user_id="u1", role="operator", scopes=["tools:execute"]
        )
        harness.tower.add("admin-key-1", key_id="k2", user_id="u2", role="admin")
        return harness

    return factory


@pytest.fixture
async def wsg(make_ws: WsFactory) -> Harness:
    return await make_ws()


async def receive(ws: ClientWebSocketResponse, timeout: float = 3.0) -> Any:
    return await ws.receive(timeout=timeout)


async def authenticate(ws: ClientWebSocketResponse, key: str) -> dict[str, Any]:
    await ws.send_str(json.dumps({"type": "auth", "api_key": key}))
    msg = await receive(ws)
    assert msg.type is WSMsgType.TEXT, msg
    answer: dict[str, Any] = json.loads(msg.data)
    return answer


async def echo(ws: ClientWebSocketResponse, text: str = "ping") -> None:
    await ws.send_str(text)
    msg = await receive(ws)
    assert (msg.type, msg.data) == (WSMsgType.TEXT, text)


# --------------------------------------------------------------------------- header auth


async def test_header_auth_relays_text_and_binary_with_a_jwt_and_no_key(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    ws = await wsg.client.ws_connect("/chat?room=1", headers={**KEY, "X-Request-Id": "rid-1"})
    await echo(ws, "hello")
    await ws.send_bytes(b"\x00\x01binary")
    msg = await receive(ws)
    assert (msg.type, msg.data) == (WSMsgType.BINARY, b"\x00\x01binary")
    await ws.close()

    (seen,) = ws_upstream.handshakes
    assert seen.path == "/chat?room=1"
    scheme, token = seen.headers["authorization"].split(" ", 1)
    assert scheme == "Bearer"
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="internal")
    assert (claims["sub"], claims["role"], claims["key_id"]) == ("u1", "operator", "k1")
    assert "x-api-key" not in seen.headers
    assert not any("good-key-1" in value for value in seen.headers.values())
    assert seen.headers["x-request-id"] == "rid-1"
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"
    assert seen.headers["x-forwarded-proto"] == "http"
    assert "x-forwarded-host" in seen.headers


async def test_forwarded_for_keeps_a_trusted_proxys_chain_as_http_does(
    make_ws: WsFactory, ws_upstream: WsUpstream
) -> None:
    trusted = await make_ws(server={"trusted_proxies": ["127.0.0.1/32"]})
    ws = await trusted.client.ws_connect("/chat", headers={**KEY, "X-Forwarded-For": "203.0.113.5"})
    await echo(ws)
    await ws.close()
    untrusted = await make_ws()
    ws = await untrusted.client.ws_connect(
        "/chat", headers={**KEY, "X-Forwarded-For": "203.0.113.5"}
    )
    await echo(ws)
    await ws.close()
    first, second = ws_upstream.handshakes
    assert first.headers["x-forwarded-for"] == "203.0.113.5, 127.0.0.1"
    assert second.headers["x-forwarded-for"] == "127.0.0.1"  # a client's own claim is dropped


async def test_header_auth_failures_are_http_errors_before_the_upgrade(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    wsg.tower.mode = "ok"
    response = await wsg.client.get("/chat", headers={**UPGRADE, "X-API-Key": "wrong-key"})
    assert response.status == 401
    assert (await response.json())["error"] == "invalid_key"
    assert "WWW-Authenticate" in response.headers

    response = await wsg.client.get("/admin/chat", headers={**UPGRADE, **KEY})
    assert response.status == 403
    body = await response.json()
    assert body == {
        "error": "missing_capability",
        "detail": "Missing required capability: admin:write",
    }

    with pytest.raises(WSServerHandshakeError) as refused:
        await wsg.client.ws_connect("/chat", headers={"X-API-Key": "wrong-key"})
    assert refused.value.status == 401
    assert ws_upstream.handshakes == []


async def test_header_auth_tower_down_is_503(wsg: Harness, ws_upstream: WsUpstream) -> None:
    wsg.tower.mode = "error500"
    response = await wsg.client.get("/chat", headers={**UPGRADE, **KEY})
    assert response.status == 503
    assert (await response.json())["error"] == "tower_unavailable"
    assert "Retry-After" in response.headers
    assert ws_upstream.handshakes == []


async def test_public_route_relays_without_auth_or_credentials(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    ws = await wsg.client.ws_connect("/open/feed", headers=KEY)
    await echo(ws)
    await ws.close()
    (seen,) = ws_upstream.handshakes
    assert "authorization" not in seen.headers and "x-api-key" not in seen.headers
    assert wsg.tower.calls == []


# --------------------------------------------------------------------------- first-message auth


async def test_first_message_auth_relays_and_answers_auth_ok(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    ws = await wsg.client.ws_connect("/chat")
    assert ws_upstream.handshakes == []
    assert await authenticate(ws, "good-key-1") == {
        "type": "auth_ok",
        "user_id": "u1",
        "role": "operator",
    }
    await echo(ws, "after auth")
    await ws.close()

    (seen,) = ws_upstream.handshakes
    token = seen.headers["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="internal")
    assert claims["sub"] == "u1"
    assert not any("good-key-1" in value for value in seen.headers.values())
    assert ws_upstream.received == ["after auth"]  # the auth message itself stays at the gateway


async def test_first_message_bad_key_gets_an_error_then_4401(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    ws = await wsg.client.ws_connect("/chat")
    assert await authenticate(ws, "wrong-key") == {"type": "error", "message": "Invalid API key"}
    msg = await receive(ws)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4401)
    assert ws_upstream.handshakes == []


async def test_first_message_missing_capability_is_4403(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    ws = await wsg.client.ws_connect("/admin/chat")
    answer = await authenticate(ws, "good-key-1")
    assert answer == {"type": "error", "message": "Missing required capability: admin:write"}
    msg = await receive(ws)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4403)
    assert ws_upstream.handshakes == []


async def test_first_message_tower_down_is_1013(wsg: Harness, ws_upstream: WsUpstream) -> None:
    wsg.tower.mode = "error500"
    ws = await wsg.client.ws_connect("/chat")
    answer = await authenticate(ws, "good-key-1")
    assert answer == {"type": "error", "message": "Service unavailable"}
    msg = await receive(ws)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1013)
    assert ws_upstream.handshakes == []


async def test_no_auth_message_times_out_with_4408(
    make_ws: WsFactory, ws_upstream: WsUpstream
) -> None:
    harness = await make_ws(websocket={"auth_timeout": 0.5})
    ws = await harness.client.ws_connect("/chat")
    started = time.monotonic()
    msg = await receive(ws)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4408)
    assert 0.4 < time.monotonic() - started < 2.0
    assert ws_upstream.handshakes == []


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x00binary first", 4400),
        ("not json", 4400),
        ('{"type": "hello", "api_key": "good-key-1"}', 4400),
        ('{"type": "auth"}', 4400),
        ('{"type": "auth", "api_key": 12}', 4400),
        ('["auth", "good-key-1"]', 4400),
        (json.dumps({"type": "auth", "api_key": "good-key-1", "pad": "x" * 20_000}), 1008),
    ],
)
async def test_anything_but_an_auth_message_first_is_closed_and_never_relayed(
    wsg: Harness, ws_upstream: WsUpstream, frame: str | bytes, code: int
) -> None:
    ws = await wsg.client.ws_connect("/chat")
    if isinstance(frame, bytes):
        await ws.send_bytes(frame)
    else:
        await ws.send_str(frame)
    msg = await receive(ws)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, code)
    assert msg.extra  # a reason says what was wrong
    assert ws_upstream.handshakes == [] and ws_upstream.received == []
    assert wsg.tower.calls == []


async def test_an_unreachable_upstream_is_502_or_1014(wsg: Harness) -> None:
    response = await wsg.client.get("/down/chat", headers={**UPGRADE, **KEY})
    assert response.status == 502
    assert (await response.json())["error"] == "upstream_unavailable"

    ws = await wsg.client.ws_connect("/down/chat")
    assert (await authenticate(ws, "good-key-1"))["type"] == "auth_ok"
    msg = await receive(ws)
    assert json.loads(msg.data) == {"type": "error", "message": "Upstream unavailable"}
    msg = await receive(ws)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1014)


# --------------------------------------------------------------------------- origin


async def test_origin_outside_allowed_origins_is_refused_before_the_upgrade(
    make_ws: WsFactory, ws_upstream: WsUpstream
) -> None:
    harness = await make_ws(websocket={"allowed_origins": ["https://app.example.com"]})
    evil = {**UPGRADE, **KEY, "Origin": "https://evil.example.com"}
    response = await harness.client.get("/chat", headers=evil)
    assert response.status == 403
    assert (await response.json())["error"] == "origin_not_allowed"
    with pytest.raises(WSServerHandshakeError) as refused:
        await harness.client.ws_connect("/chat", origin="https://evil.example.com")
    assert refused.value.status == 403
    assert harness.tower.calls == [] and ws_upstream.handshakes == []

    ws = await harness.client.ws_connect("/chat", headers=KEY, origin="https://app.example.com")
    await echo(ws)
    await ws.close()


# --------------------------------------------------------------------------- key lifetime


async def test_a_key_that_expires_while_connected_closes_its_socket(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    wsg.tower.add(
        "short-key", key_id="k3", user_id="u3", role="operator", expires_at=time.time() + 1.5
    )
    ws = await wsg.client.ws_connect("/chat", headers={"X-API-Key": "short-key"})
    await echo(ws)
    msg = await receive(ws, timeout=2.5)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4401)
    assert "expired" in msg.extra
    await until(lambda: ws_upstream.closes == [(4401, "API key has expired")])


async def test_admin_invalidation_closes_that_keys_sockets_only(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    ws = await wsg.client.ws_connect("/chat", headers=KEY)
    first = await wsg.client.ws_connect("/chat")
    await authenticate(first, "good-key-1")
    other = await wsg.client.ws_connect("/chat", headers=ADMIN_KEY)
    public = await wsg.client.ws_connect("/open/feed")
    await echo(ws)

    response = await wsg.ops.delete("/admin/cache/k1", headers=wsg.admin_headers())
    assert response.status == 200
    for socket in (ws, first):
        msg = await receive(socket, timeout=1.0)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4401)
    await echo(other)

    response = await wsg.ops.delete("/admin/cache", headers=wsg.admin_headers())
    assert response.status == 200
    msg = await receive(other, timeout=1.0)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4401)
    await echo(public)  # no key, nothing to invalidate
    await public.close()


async def test_revalidation_at_the_cache_ttl_closes_a_revoked_key(
    make_ws: WsFactory, ws_upstream: WsUpstream
) -> None:
    harness = await make_ws(cache={"ttl": 1})
    ws = await harness.client.ws_connect("/chat", headers=KEY)
    await echo(ws)
    del harness.tower.keys["good-key-1"]  # revoked at the tower; nobody tells the gateway
    msg = await receive(ws, timeout=3.0)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4401)


# --------------------------------------------------------------------------- relay


async def test_close_codes_and_reasons_cross_in_both_directions(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    ws = await wsg.client.ws_connect("/chat", headers=KEY)
    await ws.send_str("!close 4000 bye")
    msg = await receive(ws)
    assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4000, "bye")

    ws = await wsg.client.ws_connect("/chat", headers=KEY)
    await echo(ws)
    await ws.close(code=4100, message=b"done here")
    await until(lambda: ws_upstream.closes == [(4100, "done here")])


async def test_an_oversized_message_closes_with_1009_and_the_gateway_keeps_serving(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    ws = await wsg.client.ws_connect("/chat", headers=KEY)
    # The gateway refuses the frame from its header and closes without reading
    # 5 MiB it will never relay, so the sender may see its own write cut short.
    with contextlib.suppress(ConnectionError):
        await ws.send_bytes(b"x" * (5 * 2**20))
    msg = await receive(ws)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
    assert ws_upstream.received == []
    await until(lambda: ws_upstream.closes == [(1009, "message too big")])

    again = await wsg.client.ws_connect("/chat", headers=KEY)
    await echo(again)
    await again.send_str(f"!big {2 * 2**20}")  # the upstream's message is bounded too
    msg = await receive(again)
    assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1009, "message too big")

    last = await wsg.client.ws_connect("/chat", headers=KEY)
    await echo(last)
    await last.close()


async def test_subprotocol_is_the_upstreams_choice_with_header_auth(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    ws = await wsg.client.ws_connect("/chat", headers=KEY, protocols=("x.unknown", "chat.v2"))
    assert ws.protocol == "chat.v2"
    await echo(ws)
    await ws.close()
    (seen,) = ws_upstream.handshakes
    assert seen.headers["sec-websocket-protocol"] == "x.unknown,chat.v2"
    assert seen.protocol == "chat.v2"


async def test_subprotocol_with_first_message_auth_is_the_clients_first_offer(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    ws = await wsg.client.ws_connect("/chat", protocols=("chat.v1", "chat.v2"))
    assert ws.protocol == "chat.v1"
    await authenticate(ws, "good-key-1")
    await echo(ws)
    await ws.close()
    (seen,) = ws_upstream.handshakes
    assert seen.headers["sec-websocket-protocol"] == "chat.v1"


async def test_shutdown_drains_http_then_closes_sockets_with_1001(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    ws = await wsg.client.ws_connect("/chat", headers=KEY)
    await echo(ws)
    started = time.monotonic()
    slow = asyncio.create_task(wsg.client.get("/sleep?s=0.6", headers=KEY))
    await until(lambda: len(wsg.upstream.seen) == 1, what="the HTTP request at the upstream")
    closing = asyncio.create_task(wsg.client.server.close())

    msg = await receive(ws, timeout=5.0)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
    assert time.monotonic() - started >= 0.55  # not before the HTTP request finished
    response = await slow
    assert response.status == 200 and (await response.json()) == {"slept": True}
    await closing
    assert ws_upstream.closes == [(1001, "going away")]


async def test_metrics_count_connections_handshakes_frames_and_bytes(wsg: Harness) -> None:
    ws = await wsg.client.ws_connect("/chat", headers=KEY)
    await echo(ws, "12345")
    text = await wsg.metrics()
    assert "tower_gateway_websocket_connections 1.0" in text
    assert 'tower_gateway_websocket_handshakes_total{outcome="accepted"} 1.0' in text
    assert 'tower_gateway_websocket_frames_total{direction="to_upstream"} 1.0' in text
    assert 'tower_gateway_websocket_frames_total{direction="to_client"} 1.0' in text
    assert 'tower_gateway_websocket_bytes_total{direction="to_upstream"} 5.0' in text
    await ws.close()

    async def closed() -> bool:
        return "tower_gateway_websocket_connections 0.0" in await wsg.metrics()

    await until(closed, what="the connection gauge back at 0")

    bad = await wsg.client.ws_connect("/chat")
    await authenticate(bad, "wrong-key")
    await receive(bad)
    text = await wsg.metrics()
    assert 'tower_gateway_websocket_handshakes_total{outcome="invalid_key"} 1.0' in text


# --------------------------------------------------------------------------- trace context


async def test_a_websocket_handshake_carries_the_trace(
    make_ws: WsFactory, ws_upstream: WsUpstream
) -> None:
    h = await make_ws()
    headers = {"X-API-Key": "good-key-1", "traceparent": PARENT, "tracestate": STATE}
    ws = await h.client.ws_connect("/chat", headers=headers)
    await ws.close()
    seen = ws_upstream.handshakes[0].headers
    trace, parent, _ = trace_parts(seen.get("traceparent"))
    assert trace == TRACE and parent != CLIENT_SPAN
    assert seen.get("tracestate") == STATE
    assert trace_parts(h.tower.headers[0].get("traceparent")) == (trace, parent, "01")


async def test_first_message_websocket_auth_calls_the_tower_in_the_trace(
    make_ws: WsFactory, ws_upstream: WsUpstream
) -> None:
    h = await make_ws()
    ws = await h.client.ws_connect("/chat", headers={"traceparent": PARENT})
    await ws.send_str(json.dumps({"type": "auth", "api_key": "good-key-1"}))
    assert json.loads((await ws.receive(timeout=3)).data)["type"] == "auth_ok"
    await ws.close()
    assert trace_parts(h.tower.headers[0].get("traceparent"))[0] == TRACE
    assert trace_parts(ws_upstream.handshakes[0].headers.get("traceparent"))[0] == TRACE
