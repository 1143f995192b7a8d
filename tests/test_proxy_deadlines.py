"""How a response leaves the gateway: route deadlines on the head and on the body, a small
answer as one write, and `Expect: 100-continue` answered only after the checks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import ClientPayloadError

from tests.conftest import FakeUpstream, GatewayFactory, Harness, RawHandler
from tests.security.conftest import exchange, parse_replies, request_bytes
from tests.test_proxy import GOOD, error_body

RawServer = Callable[[RawHandler], Awaitable[str]]


def head_then(body: bytes, declared: int) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {declared}\r\n\r\n"
    ).encode() + body


def answer_once(reply: bytes, *, hold: float) -> RawHandler:
    """An upstream that reads one request head, writes `reply`, stays silent for `hold`
    seconds, then closes (closed as well when the test ends first and cancels it)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
            await asyncio.sleep(hold)
        finally:
            writer.close()

    return handler


async def raw_gateway(make_gateway: GatewayFactory, url: str, timeout: float = 0.5) -> Harness:
    h = await make_gateway(routes=[{"path": "/", "upstream": url, "timeout": timeout}])
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    return h


# --------------------------------------------------------------------------- the body's deadline


async def test_a_response_body_that_stalls_is_cut_after_the_route_timeout(
    make_gateway: GatewayFactory, raw_server: RawServer
) -> None:
    handler = answer_once(
        head_then(b"x" * 100_000, 1_000_000), hold=5
    )  # more than one chunk, then silence
    h = await raw_gateway(make_gateway, await raw_server(handler))
    started = time.monotonic()
    response = await h.client.get("/big", headers=GOOD)
    assert response.status == 200
    with pytest.raises(ClientPayloadError):
        await asyncio.wait_for(response.read(), 5)
    assert 0.4 < time.monotonic() - started < 3


async def test_a_slow_body_without_long_silences_is_relayed_whole(
    make_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    # 1.2 s in all, never 0.5 s without a byte: the route timeout is about silence.
    h = await make_gateway(
        routes=[{"path": "/stream", "upstream": fake_upstream.url, "timeout": 0.5, "auth": False}]
    )
    response = await h.client.get("/stream?n=4&gap=0.3")
    assert response.status == 200
    assert await response.read() == b"chunk-0\nchunk-1\nchunk-2\nchunk-3\n"


async def test_a_small_body_that_stalls_is_504(
    make_gateway: GatewayFactory, raw_server: RawServer
) -> None:
    handler = answer_once(head_then(b"partial", 500), hold=5)
    h = await raw_gateway(make_gateway, await raw_server(handler))
    started = time.monotonic()
    response = await h.client.get("/small", headers=GOOD)
    await error_body(response, 504, "upstream_timeout")
    assert time.monotonic() - started < 3


async def test_a_small_body_cut_short_is_502(
    make_gateway: GatewayFactory, raw_server: RawServer
) -> None:
    handler = answer_once(head_then(b"only this", 500), hold=0)
    h = await raw_gateway(make_gateway, await raw_server(handler))
    response = await h.client.get("/small", headers=GOOD)
    await error_body(response, 502, "upstream_unavailable")
    # The gateway still serves the next request.
    response = await h.client.get("/small", headers=GOOD)
    await error_body(response, 502, "upstream_unavailable")


# --------------------------------------------------------------------------- one write


async def test_a_small_answer_leaves_in_one_write(
    gw: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    ours = writer.get_extra_info("sockname")
    writes: list[int] = []
    transport_class = type(writer.transport)  # the server side's transports are the same kind
    original_write, original_writelines = transport_class.write, transport_class.writelines

    def write(self: asyncio.WriteTransport, data: bytes) -> None:
        if self.get_extra_info("peername") == ours:
            writes.append(len(data))
        original_write(self, data)  # type: ignore[arg-type]

    def writelines(self: asyncio.WriteTransport, chunks: Any) -> None:
        chunks = list(chunks)
        if self.get_extra_info("peername") == ours:
            writes.append(sum(len(c) for c in chunks))
        original_writelines(self, chunks)  # type: ignore[arg-type]

    monkeypatch.setattr(transport_class, "write", write)
    monkeypatch.setattr(transport_class, "writelines", writelines)
    try:
        writer.write(request_bytes("/echo", ("X-API-Key", "good-key-1")))
        await writer.drain()
        answer = await read_some(reader, b"}")
    finally:
        writer.close()
    replies = parse_replies(answer)
    assert len(replies) == 1 and replies[0].status == 200
    assert json.loads(replies[0].body)["path"] == "/echo"
    # Head and body went to the client's socket in one write: one system call.
    assert writes == [len(answer)]


@pytest.mark.parametrize("size", [0, 1, 65_536, 65_537, 300_000])
async def test_bodies_on_either_side_of_one_chunk_arrive_whole(
    make_gateway: GatewayFactory, raw_server: RawServer, size: int
) -> None:
    body = bytes(i % 251 for i in range(size))

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            with_head = await reader.readuntil(b"\r\n\r\n")
            if not with_head:
                break
            writer.write(head_then(body, size))
            await writer.drain()

    h = await raw_gateway(make_gateway, await raw_server(handler))
    for _ in range(2):  # the pooled upstream connection is reused cleanly
        response = await h.client.get("/b", headers=GOOD)
        assert response.status == 200
        assert response.headers["Content-Length"] == str(size)
        assert await response.read() == body


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_pass_through(
    make_gateway: GatewayFactory, raw_server: RawServer, status: int
) -> None:
    handler = answer_once(f'HTTP/1.1 {status} X\r\nETag: "v1"\r\n\r\n'.encode(), hold=0.2)
    h = await raw_gateway(make_gateway, await raw_server(handler))
    response = await h.client.get("/n", headers=GOOD)
    assert response.status == status
    assert response.headers["ETag"] == '"v1"'
    assert await response.read() == b""


async def test_head_keeps_the_upstreams_content_length(
    make_gateway: GatewayFactory, raw_server: RawServer
) -> None:
    handler = answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", hold=0.2)
    h = await raw_gateway(make_gateway, await raw_server(handler))
    response = await h.client.head("/h", headers=GOOD)
    assert response.status == 200
    assert response.headers["Content-Length"] == "1234"
    assert await response.read() == b""


# --------------------------------------------------------------------------- 100-continue


def upload_head(key: str, expect: str = "100-continue", size: int = 5) -> bytes:
    return (
        f"POST /up HTTP/1.1\r\nHost: gw\r\nX-API-Key: {key}\r\nContent-Length: {size}\r\n"
        f"Expect: {expect}\r\nConnection: close\r\n\r\n"
    ).encode()


async def read_some(reader: asyncio.StreamReader, until: bytes, timeout: float = 3) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while until not in data and time.monotonic() < deadline:
        chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
        if not chunk:
            break
        data += chunk
    return data


async def test_100_continue_comes_after_the_checks_then_the_body_goes_through(
    gw: Harness,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    try:
        writer.write(upload_head("good-key-1"))
        await writer.drain()
        interim = await read_some(reader, b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        await writer.drain()
        rest = await read_some(reader, b"}")
    finally:
        writer.close()
    replies = parse_replies(rest)
    assert replies and replies[0].status == 200
    assert json.loads(replies[0].body)["size"] == 5
    assert gw.upstream.seen[-1].body_size == 5
    assert "expect" not in gw.upstream.seen[-1].headers


async def test_a_refused_upload_gets_its_answer_without_100_continue(gw: Harness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    try:
        writer.write(upload_head("not-a-known-key"))
        await writer.drain()
        answer = await read_some(reader, b"}")
    finally:
        writer.close()
    assert b"100 Continue" not in answer
    replies = parse_replies(answer)
    assert replies[0].status == 401
    assert json.loads(replies[0].body)["error"] == "invalid_key"
    assert not gw.upstream.seen


async def test_a_refused_upload_that_waited_for_100_continue_closes_the_connection(
    gw: Harness,
) -> None:
    head = upload_head("not-a-known-key").replace(b"Connection: close\r\n", b"")
    result = await exchange(gw.client.port, head, timeout=3)
    assert result.replies[0].status == 401
    # Whatever the client sends next could be the body it held back: not read as a request.
    assert result.closed


async def test_an_unknown_expectation_is_417(gw: Harness) -> None:
    result = await exchange(gw.client.port, upload_head("good-key-1", expect="teapot") + b"hello")
    assert result.replies[0].status == 417
    assert json.loads(result.replies[0].body)["error"] == "expectation_failed"
    assert b"teapot" not in result.raw
    assert not gw.upstream.seen


async def test_an_aiohttp_client_uploading_with_expect_gets_through(gw: Harness) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 10_000

    response = await gw.client.post("/up", data=body(), headers=GOOD, expect100=True)
    assert response.status == 200
    assert (await response.json())["size"] == 10_000
