"""One decision, every way in: explain, an HTTP request, a WebSocket upgrade with the key in
its headers and one with the key in its first message give the same answer for the same key
and route: outcome, status, reason id and (after a 101) the close code."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import WSMsgType, WSServerHandshakeError, web
from aiohttp.test_utils import TestServer

from tests.conftest import GatewayFactory, Harness
from tests.security.conftest import RecordingLog

UPGRADE = "websocket"


async def _both(request: web.Request) -> web.StreamResponse:
    """An upstream that answers plain HTTP with 200 and echoes WebSockets."""
    if request.headers.get("Upgrade", "").lower() != UPGRADE:
        return web.json_response({"ok": True})
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str(msg.data)
    return ws


@pytest.fixture
async def gateway(
    make_gateway: GatewayFactory, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> Harness:
    app = web.Application()
    app.router.add_get("/{tail:.*}", _both)
    upstream = str((await aiohttp_server(app, host="127.0.0.1")).make_url("")).rstrip("/")
    routes = [
        {"path": "/admin", "upstream": upstream, "require": ["admin:write"]},
        {"path": "/", "upstream": upstream},
    ]
    h = await make_gateway(routes=routes)
    h.gateway.access_log = RecordingLog()
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    h.tower.add("old-key-1", key_id="k4", user_id="u4", role="operator", expires_at=time.time() - 5)
    h.tower.add("limited-key", key_id="k3", user_id="u3", role="operator", rate_limit=1)
    return h


@dataclass(frozen=True)
class Answer:
    outcome: str  # allow | deny | error
    status: int
    reason: str | None  # None: an allow (its reason is where the identity came from)
    close: int | None = None  # the close code after a 101; None for an allow


CASES: dict[str, tuple[str, str, str, Answer]] = {
    # name: (key, path, tower mode, the one answer)
    "allowed": ("good-key-1", "/chat", "ok", Answer("allow", 200, None)),
    "invalid": ("nobody-key-1", "/chat", "ok", Answer("deny", 401, "invalid_key", 4401)),
    "expired": ("old-key-1", "/chat", "ok", Answer("deny", 401, "expired_key", 4401)),
    "malformed": ("two words", "/chat", "ok", Answer("deny", 400, "malformed_key", 4401)),
    "forbidden": (
        "good-key-1",
        "/admin/chat",
        "ok",
        Answer("deny", 403, "missing_capability", 4403),
    ),
    "rate_limited": ("limited-key", "/chat", "ok", Answer("deny", 429, "rate_limited", 4429)),
    "tower_down": (
        "unseen-key-1",
        "/chat",
        "error500",
        Answer("error", 503, "tower_unavailable", 1013),
    ),
}


def last_line(h: Harness) -> dict[str, Any]:
    log = h.gateway.access_log
    assert isinstance(log, RecordingLog)
    return log.lines[-1]


async def by_explain(h: Harness, key: str, path: str) -> Answer:
    response = await h.ops.post(
        "/admin/explain", json={"key": key, "path": path}, headers=h.admin_headers()
    )
    body = await response.json()
    # explain says whether the request is forwarded: an outage is a deny there.
    outcome = "error" if body["status"] >= 500 else body["decision"]
    allowed = outcome == "allow"
    return Answer(outcome, body["status"], None if allowed else body["reason"])


async def by_http(h: Harness, key: str, path: str) -> Answer:
    response = await h.client.get(path, headers={"X-API-Key": key})
    line = last_line(h)
    if response.status == 200:
        assert (await response.json()) == {"ok": True}
        return Answer(line["decision"], 200, None)
    body = await response.json()
    assert body["error"] == line["reason"]
    return Answer(line["decision"], response.status, body["error"])


async def by_upgrade(h: Harness, key: str, path: str) -> Answer:
    try:
        ws = await h.client.ws_connect(path, headers={"X-API-Key": key})
    except WSServerHandshakeError as exc:
        line = last_line(h)
        return Answer(line["decision"], exc.status, line["reason"])
    await ws.send_str("hello")
    assert (await ws.receive(timeout=3)).data == "hello"
    await ws.close()
    return Answer("allow", 200, None)


async def by_first_message(h: Harness, key: str, path: str) -> Answer:
    log = h.gateway.access_log
    assert isinstance(log, RecordingLog)
    before = len(log.lines)
    ws = await h.client.ws_connect(path)
    await ws.send_str(json.dumps({"type": "auth", "api_key": key}))
    answer = json.loads((await ws.receive(timeout=3)).data)
    if answer["type"] == "auth_ok":
        await ws.send_str("hello")
        assert (await ws.receive(timeout=3)).data == "hello"
        await ws.close()
        return Answer("allow", 200, None)
    closing = await ws.receive(timeout=3)
    assert closing.type is WSMsgType.CLOSE
    await ws.close()
    for _ in range(300):  # the upgrade's line is written once its handler has ended
        if len(log.lines) > before:
            break
        await asyncio.sleep(0.01)
    line = log.lines[-1]
    return Answer(line["decision"], 0, line["reason"], closing.data)


@pytest.mark.parametrize("case", list(CASES))
async def test_every_way_in_gives_the_same_answer(gateway: Harness, case: str) -> None:
    key, path, mode, expected = CASES[case]
    h = gateway
    if case == "rate_limited":
        # The key's one request a minute is spent; explain only reads the bucket.
        assert (await h.client.get(path, headers={"X-API-Key": key})).status == 200
    h.tower.mode = mode
    plain = Answer(expected.outcome, expected.status, expected.reason)
    assert await by_explain(h, key, path) == plain
    assert await by_http(h, key, path) == plain
    assert await by_upgrade(h, key, path) == plain
    first = await by_first_message(h, key, path)
    assert (first.outcome, first.reason, first.close) == (
        expected.outcome,
        expected.reason,
        expected.close,
    )
