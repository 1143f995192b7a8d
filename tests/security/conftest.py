"""Fixtures of the adversarial suite: the gateway as served, raw sockets, and a gateway
run as its own process (`python -m gateway serve`), with aiohttp's C parser or with
its pure-Python one (`AIOHTTP_NO_EXTENSIONS=1`).

The shared `make_gateway` already serves the proxy app under `GatewayRunner`, as
`gateway.runtime.serve` runs it, so requests aiohttp's parser refuses are answered the way
a deployed gateway answers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.ops.accesslog import AccessLog
from tests.conftest import (
    ENV,
    FakeTower,
    FakeUpstream,
    GatewayFactory,
    Harness,
)

GOOD = "good-key-1"  # k1 / u1, operator, scope tools:execute
ADMIN = "admin-key-1"  # k2 / u2, admin
# Printable keys that contain no other test string, so a leak is unambiguous.
KEYS = (GOOD, ADMIN)


def add_keys(tower: FakeTower) -> None:
    tower.add(GOOD, key_id="k1", user_id="u1", role="operator", scopes=["tools:execute"])
    tower.add(ADMIN, key_id="k2", user_id="u2", role="admin")


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> Harness:
    harness = await make_gateway()
    add_keys(harness.tower)
    return harness


class RecordingLog(AccessLog):
    """An access log that keeps its lines (as the JSON the real one writes) in a list."""

    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.lines: list[dict[str, Any]] = []
        self.text: list[str] = []

    def emit(self, line: dict[str, Any]) -> None:
        text = json.dumps(line, ensure_ascii=True, default=str)
        self.text.append(text)
        self.lines.append(json.loads(text))


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Exchange:
    """Everything one connection gave back: the bytes, the replies in them, and whether
    the gateway closed the connection (rather than the client giving up waiting)."""

    raw: bytes
    closed: bool
    replies: list[Reply] = field(default_factory=list)

    @property
    def status(self) -> int:
        assert self.replies, f"no reply at all: {self.raw[:200]!r}"
        return self.replies[0].status

    @property
    def first(self) -> Reply:
        assert self.replies, f"no reply at all: {self.raw[:200]!r}"
        return self.replies[0]


def parse_replies(raw: bytes) -> list[Reply]:
    """Splits a byte stream into HTTP/1.x responses (Content-Length or chunked bodies)."""
    replies: list[Reply] = []
    rest = raw
    while rest.startswith(b"HTTP/"):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        fields = {k.lower(): v for k, v in headers}
        if "content-length" in fields:
            size = int(fields["content-length"])
            body, rest = rest[:size], rest[size:]
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                body, rest = body + rest[:size], rest[size + 2 :]
                if size == 0:
                    break
        else:
            body, rest = rest, b""
        replies.append(Reply(status, headers, body))
    return replies


async def exchange(
    port: int,
    *parts: bytes,
    timeout: float = 3.0,
    pause: float = 0.05,
    local_addr: str | None = None,
    first_reply: bool = False,
) -> Exchange:
    """Sends `parts` on one connection (a short pause between them, so each may arrive
    as its own segment), then reads until the gateway closes or `timeout` passes (or,
    with `first_reply`, until one whole reply has arrived)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(local_addr, 0) if local_addr else None
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    raw, closed = b"", False
    try:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), remaining)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            raw += chunk
            if first_reply and parse_replies(raw):
                break
    except ConnectionError:
        closed = True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return Exchange(raw, closed, parse_replies(raw))


def request_bytes(
    target: str,
    *headers: tuple[str, str],
    method: str = "GET",
    version: str = "HTTP/1.1",
    body: bytes = b"",
    close: bool = True,
) -> bytes:
    """One request exactly as written: no normalisation, no re-quoting."""
    lines = [f"{method} {target} {version}", "Host: gw"]
    lines += [f"{name}: {value}" for name, value in headers]
    if close:
        lines.append("Connection: close")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------------------- memory


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size from /proc (Linux), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


# --------------------------------------------------------------------------- a gateway process


class BackgroundApps:
    """aiohttp applications served from a thread's own event loop, so a test on any loop
    (or none) can use them, and a gateway process can reach them."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runners: list[web.AppRunner] = []

    def serve(self, app: web.Application) -> str:
        async def start() -> str:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runners.append(runner)
            server = site._server
            assert server is not None
            port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            return f"http://127.0.0.1:{port}"

        return asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)

    def close(self) -> None:
        async def stop() -> None:
            for runner in self._runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class GatewayProcess:
    """`python -m gateway serve` on loopback, with its tower and upstream in this process."""

    parser: str  # "c" | "python"
    process: subprocess.Popen[bytes]
    port: int
    ops_port: int
    tower: FakeTower
    upstream: FakeUpstream
    stdout: Path
    stderr: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def logs(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    async def logs_with(self, text: str, count: int = 1, timeout: float = 5.0) -> str:
        """The logs once `text` is in them `count` times: lines are written by a thread,
        a little later than the answer."""
        deadline = time.monotonic() + timeout
        while (logs := self.logs()).count(text) < count:
            assert time.monotonic() < deadline, f"{text!r} not logged {count} times"
            await asyncio.sleep(0.05)
        return logs


def _wait_ready(proc: subprocess.Popen[bytes], ops_port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the gateway process exited while starting"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the gateway process did not become ready")


@contextlib.contextmanager
def gateway_process(parser: str, workdir: Path) -> Iterator[GatewayProcess]:
    apps = BackgroundApps()
    tower, upstream = FakeTower(), FakeUpstream()
    add_keys(tower)
    tower.url = apps.serve(tower.app())
    upstream.url = apps.serve(upstream.app())
    port, ops_port = free_port(), free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_timeout": 1},
        "ops": {"host": "127.0.0.1", "port": ops_port},
        "tower": {"url": tower.url, "timeout": 1.0, "retries": 0},
        "routes": [
            {"path": "/public", "upstream": upstream.url, "auth": False},
            {"path": "/admin", "upstream": upstream.url, "require": ["admin:write"]},
            {"path": "/", "upstream": upstream.url, "timeout": 5},
        ],
        "log": {"access": True, "level": "INFO"},
    }
    path = workdir / f"gateway-{parser}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, **ENV}
    env.pop("AIOHTTP_NO_EXTENSIONS", None)
    if parser == "python":
        env["AIOHTTP_NO_EXTENSIONS"] = "1"
    stdout, stderr = workdir / f"{parser}.out", workdir / f"{parser}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            env=env,
            stdout=out,
            stderr=err,
            cwd=workdir,
        )
    try:
        _wait_ready(proc, ops_port)
        yield GatewayProcess(parser, proc, port, ops_port, tower, upstream, stdout, stderr)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        apps.close()


@pytest.fixture(scope="package", params=["c", "python"])
def parser_gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """A gateway process per HTTP parser; tests reset `tower.calls` and `upstream.seen`."""
    with gateway_process(request.param, tmp_path_factory.mktemp(f"gw-{request.param}")) as gp:
        yield gp


@pytest.fixture
def gproc(parser_gateway: GatewayProcess) -> GatewayProcess:
    parser_gateway.tower.calls.clear()
    parser_gateway.upstream.seen.clear()
    parser_gateway.tower.mode = "ok"
    assert parser_gateway.alive()
    return parser_gateway


# --------------------------------------------------------------------------- WebSocket


@dataclass
class WsSeen:
    path: str
    headers: list[tuple[str, str]]


@dataclass
class WsUpstream:
    """A WebSocket upstream that records each handshake and every message, and echoes."""

    handshakes: list[WsSeen] = field(default_factory=list)
    received: list[str | bytes] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._socket)
        return app

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.handshakes.append(WsSeen(request.raw_path, list(request.headers.items())))
        async for msg in ws:
            self.received.append(msg.data)
            await ws.send_str(str(msg.data))
        return ws

    def everything(self) -> str:
        """All it ever saw, as one text, to search for a leak."""
        parts = [seen.path for seen in self.handshakes]
        parts += [f"{k}: {v}" for seen in self.handshakes for k, v in seen.headers]
        parts += [m if isinstance(m, str) else m.decode("latin-1") for m in self.received]
        return "\n".join(parts)


@pytest.fixture
async def ws_upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> WsUpstream:
    upstream = WsUpstream()
    server = await aiohttp_server(upstream.app(), host="127.0.0.1")
    upstream.url = str(server.make_url("")).rstrip("/")
    return upstream


@pytest.fixture
async def wsg(make_gateway: GatewayFactory, ws_upstream: WsUpstream) -> Harness:
    """A gateway whose routes lead to `ws_upstream`: /open is public, the rest needs a key."""
    harness = await make_gateway(
        routes=[
            {"path": "/open", "upstream": ws_upstream.url, "auth": False},
            {"path": "/", "upstream": ws_upstream.url},
        ],
        websocket={"auth_timeout": 2},
    )
    add_keys(harness.tower)
    return harness


def upstream_text(upstream: FakeUpstream) -> str:
    """Everything the HTTP upstream ever saw (paths and headers), as one text."""
    parts = [seen.path for seen in upstream.seen]
    parts += [f"{k}: {v}" for seen in upstream.seen for k, vs in seen.headers.items() for v in vs]
    return "\n".join(parts)
