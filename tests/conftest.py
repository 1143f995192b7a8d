"""Shared fixtures: a real fake tower, a real fake upstream, and gateway factories.

Everything runs as aiohttp applications on 127.0.0.1; nothing under test is
patched. The fake tower checks the gateway's credentials exactly as the
contract specifies and can be told to misbehave.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from gateway.app import Gateway
from gateway.config import Config, parse_config
from gateway.http.server import GatewayRunner
from gateway.ops.accesslog import AccessLog

pytest_plugins = ("tests.redis_support",)

TOWER_API_KEY = "tower-api-key-for-tests"
TOWER_SECRET = "tower-secret-for-tests-0123456789"
JWT_SECRET = "jwt-secret-for-tests-0123456789abcdef"
ADMIN_TOKEN = "admin-token-for-tests-0123"
FINGERPRINT_SECRET = "fingerprint-secret-for-tests-0123456789"
ENV = {
    "TOWER_API_KEY": TOWER_API_KEY,
    "TOWER_SECRET": TOWER_SECRET,
    "GATEWAY_JWT_SECRET": JWT_SECRET,
    "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
    "GATEWAY_FINGERPRINT_SECRET": FINGERPRINT_SECRET,
}
SECRETS = (TOWER_API_KEY, TOWER_SECRET, JWT_SECRET, ADMIN_TOKEN, FINGERPRINT_SECRET)


async def until(
    condition: Callable[[], object],
    within: float = 5.0,
    what: str = "the condition",
    *,
    interval: float = 0.01,
    ignore: tuple[type[BaseException], ...] = (),
) -> None:
    """Wait until `condition()` (a plain or an async callable) is true, polling every
    `interval` seconds; fail the test after `within` seconds. Errors of the `ignore`
    types count as "not yet". For tests to wait for a state, never for a guessed time."""
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while True:
        try:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {within}s waiting for {what} (last error: {last!r})"
            )
        await asyncio.sleep(interval)


def tower_record(
    key_id: str,
    user_id: str,
    role: str,
    scopes: list[str] | None = None,
    expires_at: float | None = None,
    **metadata: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "valid": True,
        "key_id": key_id,
        "user_id": user_id,
        "role": role,
        "scopes": scopes or [],
    }
    if expires_at is not None:
        body["expires_at"] = expires_at
    if metadata:
        body["metadata"] = metadata
    return body


@dataclass
class FakeTower:
    """A tower on loopback. `keys` maps a raw key to the JSON answered for it."""

    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # of each call, names lowercased
    mode: str = "ok"  # ok | error500 | garbage | wrong_types | unauthorized | hang | redirect
    delay: float = 0.0
    # When set, each call is recorded and then held until the test sets the event.
    gate: asyncio.Event | None = None
    url: str = ""
    server: TestServer | None = None  # close it to take the tower down

    def add(self, key: str, **record: Any) -> None:
        self.keys[key] = tower_record(**record)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/validate", self._validate)
        app.router.add_get("/", self._root)
        return app

    async def _root(self, _request: web.Request) -> web.Response:
        return web.json_response({"service": "fake-tower"})

    async def _validate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        key = body.get("api_key")
        self.calls.append(key)
        self.headers.append({name.lower(): value for name, value in request.headers.items()})
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if (
            request.headers.get("Authorization") != f"Bearer {TOWER_API_KEY}"
            or request.headers.get("X-Tower-Secret") != TOWER_SECRET
            or request.headers.get("Content-Type") != "application/json"
        ):
            return web.json_response({"error": "bad tower credentials"}, status=401)
        mode = self.mode
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "error500":
            return web.json_response({"error": "boom"}, status=500)
        if mode == "garbage":
            return web.Response(text="<html>not json</html>", content_type="text/html")
        if mode == "wrong_types":
            return web.json_response({"valid": True, "key_id": 7, "user_id": None, "role": 1})
        if mode == "unauthorized":
            return web.json_response({"error": "tower credentials rejected"}, status=403)
        if mode == "redirect":
            raise web.HTTPFound("http://127.0.0.1:9/steal")
        answer = self.keys.get(key)
        if answer is None:
            return web.json_response({"valid": False, "reason": "invalid"}, status=401)
        return web.json_response(answer)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Scripted:
    """A tower (or a thief) answering with `handler`, or a valid admin identity when
    there is none; records every request it receives."""

    handler: Handler | None = None
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.method, request.raw_path, dict(request.headers), body))
        if self.handler is None:
            return web.json_response(tower_record("k1", "u1", "admin"))
        return await self.handler(request)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, list[str]]
    body_sha256: str
    body_size: int

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


@dataclass
class FakeUpstream:
    """An upstream on loopback that records exactly what reached it."""

    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/stream", self._stream)
        app.router.add_get("/sleep", self._sleep)
        app.router.add_get("/slow/sleep", self._sleep)  # behind the 0.5 s `/slow` route
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app

    async def _record(self, request: web.Request) -> Seen:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        seen = Seen(request.method, request.raw_path, headers, digest.hexdigest(), size)
        self.seen.append(seen)
        return seen

    async def _echo(self, request: web.Request) -> web.Response:
        seen = await self._record(request)
        return web.json_response(
            {
                "path": seen.path,
                "method": seen.method,
                "sha256": seen.body_sha256,
                "size": seen.body_size,
            },
            headers={
                "X-Upstream": "fake",
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "drop-me",
            },
        )

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        response = web.StreamResponse()
        response.content_type = "text/plain"
        await response.prepare(request)
        for i in range(int(request.query.get("n", "3"))):
            await response.write(f"chunk-{i}\n".encode())
            await asyncio.sleep(float(request.query.get("gap", "0.3")))
        await response.write_eof()
        return response

    async def _sleep(self, request: web.Request) -> web.Response:
        await self._record(request)
        await asyncio.sleep(float(request.query.get("s", "5")))
        return web.json_response({"slept": True})


@pytest.fixture
async def fake_tower(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeTower:
    tower = FakeTower()
    server = await aiohttp_server(tower.app(), host="127.0.0.1")
    tower.url = str(server.make_url("")).rstrip("/")
    tower.server = server
    return tower


@pytest.fixture
async def fake_upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeUpstream:
    upstream = FakeUpstream()
    server = await aiohttp_server(upstream.app(), host="127.0.0.1")
    upstream.url = str(server.make_url("")).rstrip("/")
    upstream.server = server
    return upstream


def gateway_config(tower_url: str, upstream_url: str, **overrides: Any) -> Config:
    data: dict[str, Any] = {
        "tower": {"url": tower_url, "timeout": 1.0},
        "routes": [
            {"path": "/public", "upstream": upstream_url, "auth": False},
            {"path": "/admin", "upstream": upstream_url, "require": ["admin:write"]},
            {"path": "/tools", "upstream": upstream_url, "require": ["execute:read_file"]},
            {"path": "/slow", "upstream": upstream_url, "timeout": 0.5},
            {"path": "/", "upstream": upstream_url},
        ],
        "log": {"access": False},
    }
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    return parse_config(data, env=ENV)


@dataclass
class Harness:
    gateway: Gateway
    client: TestClient
    ops: TestClient
    tower: FakeTower
    upstream: FakeUpstream

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def metrics(self) -> str:
        response = await self.ops.get("/metrics")
        return await response.text()


GatewayFactory = Callable[..., Awaitable[Harness]]


class GatewayTestServer(TestServer):
    """A test server that runs its app as `gateway.runtime.serve` does: under `GatewayRunner`, so
    requests aiohttp's parser refuses are answered as a deployed gateway answers them."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return GatewayRunner(self.app, **kwargs)


async def quiet_server(app: web.Application) -> TestServer:
    """A started test server as `serve` runs the gateway: under `GatewayRunner`, without
    aiohttp's access log (the gateway writes its own, which never holds a query string)."""
    server = GatewayTestServer(app, host="127.0.0.1")
    await server.start_server(access_log=None)
    return server


@pytest.fixture
async def make_gateway(
    fake_tower: FakeTower,
    fake_upstream: FakeUpstream,
    aiohttp_client: Callable[..., Awaitable[TestClient]],
) -> GatewayFactory:
    async def factory(
        clock: Callable[[], float] = time.time,
        access_log: AccessLog | None = None,
        tower_clock: Callable[[], float] = time.monotonic,
        **overrides: Any,
    ) -> Harness:
        config = gateway_config(fake_tower.url, fake_upstream.url, **overrides)
        gateway = Gateway(
            config,
            registry=CollectorRegistry(),
            clock=clock,
            access_log=access_log,
            tower_clock=tower_clock,
        )
        client = await aiohttp_client(await quiet_server(gateway.proxy_app()))
        ops = await aiohttp_client(await quiet_server(gateway.ops_app()))
        return Harness(gateway, client, ops, fake_tower, fake_upstream)

    return factory


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> Harness:
    """A gateway with default settings and two known keys."""
    harness = await make_gateway()
    harness.tower.add(
        "good-key-1",
        key_id="k1",
        user_id="u1",
        role="operator",
        scopes=["tools:execute"],
        team="blue",
    )
    harness.tower.add("admin-key-1", key_id="k2", user_id="u2", role="admin")
    return harness


# --------------------------------------------------------------------------- raw upstreams

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """Starts plain TCP servers speaking whatever bytes a test scripts: an upstream that
    misbehaves in ways aiohttp would not let it."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()
