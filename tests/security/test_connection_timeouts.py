"""Class 4: a connection that never finishes a request head is closed after
`server.header_timeout`, an idle keep-alive one after `server.keepalive_timeout`, on the
proxy and the ops listener alike."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import GatewayFactory, Harness
from tests.security.conftest import request_bytes

HEAD, IDLE = 0.4, 1.5


@pytest.fixture
async def tgw(make_gateway: GatewayFactory) -> Harness:
    return await make_gateway(server={"header_timeout": HEAD, "keepalive_timeout": IDLE})


async def closed_after(port: int, *parts: bytes, gap: float = 0.0, limit: float = 5.0) -> float:
    """Seconds from connecting until the server closes the connection (after `parts`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            if gap:
                await asyncio.sleep(gap)
        while await asyncio.wait_for(reader.read(65536), limit):
            pass
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started


def ports(h: Harness) -> list[int]:
    assert h.client.port is not None and h.ops.port is not None
    return [h.client.port, h.ops.port]


async def test_a_silent_connection_is_closed_after_the_head_timeout(tgw: Harness) -> None:
    for port in ports(tgw):
        took = await closed_after(port)
        assert HEAD * 0.8 < took < IDLE, took


@pytest.mark.parametrize(
    "partial", [b"G", b"GET /x HTTP/1.1\r\n", b"GET /x HTTP/1.1\r\nHost: gw\r\nX-A: b"]
)
async def test_half_a_head_is_closed_after_the_head_timeout(tgw: Harness, partial: bytes) -> None:
    for port in ports(tgw):
        took = await closed_after(port, partial)
        assert HEAD * 0.8 < took < IDLE, took


async def test_a_head_sent_a_byte_at_a_time_gets_no_more_time(tgw: Harness) -> None:
    head = request_bytes("/public/x")
    assert tgw.client.port is not None
    took = await closed_after(tgw.client.port, *[head[i : i + 1] for i in range(30)], gap=0.05)
    assert took < HEAD + 0.5 * 30 * 0.05 + 0.5, took


async def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(
    tgw: Harness,
) -> None:
    assert tgw.client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", tgw.client.port)
    writer.write(request_bytes("/public/x", close=False))
    await writer.drain()
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)).startswith(b"HTTP/1.1 200")
    answered = time.monotonic()
    while await asyncio.wait_for(reader.read(65536), 5):
        pass
    idle = time.monotonic() - answered
    writer.close()
    # Longer than a head may take (an idle connection is no slow head), then closed.
    assert HEAD < idle < IDLE + 1.0, idle


async def test_a_head_started_after_an_idle_spell_has_the_head_timeout(tgw: Harness) -> None:
    assert tgw.client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", tgw.client.port)
    writer.write(request_bytes("/public/x", close=False))
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    await asyncio.sleep(HEAD * 1.5)
    writer.write(b"GET /public/y HTTP/1.1\r\nHo")
    await writer.drain()
    started = time.monotonic()
    while await asyncio.wait_for(reader.read(65536), 5):
        pass
    writer.close()
    assert time.monotonic() - started < HEAD + 0.5


async def test_requests_that_keep_coming_are_not_cut(tgw: Harness) -> None:
    assert tgw.client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", tgw.client.port)
    for _ in range(6):  # longer in all than the head timeout
        writer.write(request_bytes("/public/x", close=False))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await asyncio.sleep(HEAD / 2)
    writer.close()


def test_defaults_are_ten_and_seventy_five_seconds() -> None:
    from gateway.config import ServerConfig
    from gateway.http.server import Timeouts

    assert (ServerConfig().header_timeout, ServerConfig().keepalive_timeout) == (10.0, 75.0)
    assert Timeouts() == Timeouts(10.0, 75.0)


def test_the_supervisors_ops_listener_has_the_timeouts() -> None:
    from types import SimpleNamespace

    from gateway.config import parse_config
    from gateway.http.server import TIMEOUTS, Timeouts
    from gateway.runtime.group_ops import create_group_ops_app
    from tests.conftest import ENV

    config = parse_config({"server": {"header_timeout": 3, "keepalive_timeout": 9}}, env=ENV)
    app = create_group_ops_app(SimpleNamespace(config=config))  # type: ignore[arg-type]
    assert app[TIMEOUTS] == Timeouts(3, 9)
