"""Decision-mode fixtures: a gateway with its decision listener, and real data planes
(nginx, Caddy) started on their own prefix and port in front of it, stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from gateway.app import Gateway
from gateway.decision.dataplane import caddy, nginx
from gateway.decision.dataplane.common import make_plan
from gateway.decision.listener import decision_app
from tests.conftest import FakeTower, FakeUpstream, gateway_config, quiet_server
from tests.fresh import free_port

DECISION_TOKEN = "decision-token-for-tests-0123"


@dataclass
class DecisionHarness:
    gateway: Gateway
    decision: TestClient
    proxy: TestClient
    ops: TestClient
    tower: FakeTower
    upstream: FakeUpstream
    decision_port: int

    async def metrics(self) -> str:
        response = await self.ops.get("/metrics")
        return await response.text()


DecisionFactory = Callable[..., Awaitable[DecisionHarness]]


def add_keys(tower: FakeTower) -> None:
    tower.add("good-key-1", key_id="k1", user_id="u1", role="operator", scopes=["tools:execute"])
    tower.add("admin-key-1", key_id="k2", user_id="u2", role="admin")


@pytest.fixture
async def make_decision(
    fake_tower: FakeTower,
    fake_upstream: FakeUpstream,
    aiohttp_client: Callable[..., Awaitable[TestClient]],
) -> DecisionFactory:
    async def factory(decision: dict[str, Any] | None = None, **overrides: Any) -> DecisionHarness:
        settings = {"token": DECISION_TOKEN, **(decision or {})}
        config = gateway_config(fake_tower.url, fake_upstream.url, decision=settings, **overrides)
        gateway = Gateway(config, registry=CollectorRegistry())
        # The proxy app carries the gateway's lifespan, as under `serve`.
        proxy = await aiohttp_client(await quiet_server(gateway.proxy_app()))
        ops = await aiohttp_client(await quiet_server(gateway.ops_app()))
        server = await quiet_server(decision_app(gateway))
        client = await aiohttp_client(server)
        add_keys(fake_tower)
        assert server.port is not None
        return DecisionHarness(gateway, client, proxy, ops, fake_tower, fake_upstream, server.port)

    return factory


@dataclass
class DataPlane:
    """A running nginx or Caddy: its base URL and process."""

    kind: str
    url: str
    process: subprocess.Popen[bytes]
    directory: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def _config_text(kind: str, harness: DecisionHarness, upstream: str, port: int) -> str:
    config = harness.gateway.config
    assert config.decision is not None
    # The decision listener of the test runs on a random port.
    config = dataclasses.replace(
        config, decision=dataclasses.replace(config.decision, port=harness.decision_port)
    )
    plan = make_plan(config, upstream, f"127.0.0.1:{port}", workers=1)
    text = nginx.render(plan) if kind == "nginx" else caddy.render(plan)
    if kind == "nginx" and os.geteuid() == 0:
        # As root nginx's workers would run as nobody, who cannot enter pytest's tmp dirs.
        text = "user root;\n" + text
    return text


async def start_dataplane(
    kind: str, harness: DecisionHarness, directory: Path, upstream: str | None = None
) -> DataPlane:
    binary = shutil.which(kind)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{kind} is not installed (.ci/run installs it)")
        pytest.skip(f"{kind} is not installed")
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    text = _config_text(kind, harness, upstream or harness.upstream.url, port)
    env = dict(os.environ)
    if kind == "nginx":
        path = directory / "nginx.conf"
        path.write_text(text)
        argv = [binary, "-p", str(directory), "-c", str(path), "-e", "stderr"]
        argv += ["-g", "daemon off;"]
    else:
        path = directory / "Caddyfile"
        path.write_text(text)
        argv = [binary, "run", "--adapter", "caddyfile", "--config", str(path)]
        env.update(
            HOME=str(directory), XDG_DATA_HOME=str(directory), XDG_CONFIG_HOME=str(directory)
        )
    log = open(directory / "stderr.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    plane = DataPlane(kind, f"http://127.0.0.1:{port}", process, directory)
    for _ in range(200):
        if process.poll() is not None:
            raise AssertionError(f"{kind} exited: {(directory / 'stderr.log').read_text()}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return plane
        await asyncio.sleep(0.05)
    plane.stop()
    raise AssertionError(f"{kind} did not listen: {(directory / 'stderr.log').read_text()}")


@pytest.fixture
async def dataplanes() -> AsyncIterator[list[DataPlane]]:
    """Every data plane a test starts, stopped by PID at its end."""
    started: list[DataPlane] = []
    yield started
    for plane in started:
        plane.stop()


async def ws_echo_upstream(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> tuple[str, list[dict[str, str]]]:
    """A WebSocket upstream that echoes text frames and records each upgrade's headers."""
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(f"echo:{message.data}")
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("")).rstrip("/"), seen
