"""Fixtures that run a real redis-server on loopback: `redis_server` (flushed for every test, may
be stopped and restarted on the same port) and `redis_client` (an async client for it).

Without a `redis-server` binary the tests that need it are skipped, or fail when CI=true.
Tests that use these fixtures get the `redis` marker, so `-m "not redis"` leaves them out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio

_STARTUP_TIMEOUT = 10.0
_FIXTURES = frozenset({"redis_server", "redis_client", "_redis_server_session"})


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one RESP command and return the raw first reply line (no client library needed)."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply


class RedisServer:
    """One redis-server process on 127.0.0.1 with persistence off, data kept in `directory`."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = _free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start (or restart, after `stop`) on the same port; returns once it answers PING."""
        if self.running:
            return
        self._reap()
        log_file = self.directory / "redis.log"
        # fmt: off
        argv = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(log_file),
            "--daemonize", "no",
        ]
        # fmt: on
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                if _command(self.port, "PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        log_text = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log_text}")

    def stop(self) -> None:
        """Kill the server at once, as an outage would."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._reap()

    def flushall(self) -> None:
        _command(self.port, "FLUSHALL")

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait(timeout=10)
            self._proc = None


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture(scope="session")
def _redis_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(_redis_server_session: RedisServer) -> RedisServer:
    """The shared server, running (a previous test may have stopped it) and empty."""
    _redis_server_session.start()
    _redis_server_session.flushall()
    return _redis_server_session


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """The URL of a "Redis" on loopback that accepts connections and never answers."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)
