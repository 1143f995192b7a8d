"""The remote tower client: the exact request, and a strict reading of every kind of answer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import TowerConfig
from gateway.errors import TowerFault
from gateway.tower import Identity, Rejection, parse_answer
from gateway.tower.client import MAX_BODY, RemoteTower
from tests.conftest import (
    TOWER_API_KEY,
    TOWER_SECRET,
    GatewayFactory,
    Handler,
    Harness,
    Scripted,
    tower_record,
)

ServerFactory = Callable[..., Awaitable[TestServer]]
KEY = {"X-API-Key": "good-key-1"}


@pytest.fixture
def scripted(aiohttp_server: ServerFactory) -> Callable[[Handler], Awaitable[Scripted]]:
    async def make(handler: Handler) -> Scripted:
        tower = Scripted(handler)
        server = await aiohttp_server(tower.app(), host="127.0.0.1")
        tower.url = str(server.make_url("")).rstrip("/")
        return tower

    return make


def remote(url: str, timeout: float = 0.5, **kw: Any) -> RemoteTower:
    return RemoteTower(
        TowerConfig(url=url, api_key=TOWER_API_KEY, secret=TOWER_SECRET, timeout=timeout, **kw)
    )


def answer(body: Any, status: int = 200) -> Handler:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(body), status=status, content_type="application/json")

    return handler


async def validate(url: str, key: str = "client-key", timeout: float = 0.5) -> Any:
    tower = remote(url, timeout)
    try:
        return await tower.validate(key)
    finally:
        await tower.close()


async def fault_of(url: str, timeout: float = 0.5) -> TowerFault:
    with pytest.raises(TowerFault) as info:
        await validate(url, timeout=timeout)
    return info.value


VALID = tower_record("k1", "u1", "operator", ["b", "a"], team="blue", rate_limit=5)


# --------------------------------------------------------------------------- the request


async def test_exact_request(scripted: Callable[[Handler], Awaitable[Scripted]]) -> None:
    tower = await scripted(answer(VALID))
    result = await validate(tower.url + "/", key="the-client-key")
    ((method, path, headers, body),) = tower.requests
    assert (method, path) == ("POST", "/api/v1/validate")
    assert headers["Authorization"] == f"Bearer {TOWER_API_KEY}"
    assert headers["X-Tower-Secret"] == TOWER_SECRET
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"api_key": "the-client-key"}
    assert isinstance(result, Identity)
    assert (result.key_id, result.user_id, result.role) == ("k1", "u1", "operator")
    assert result.scopes == ("a", "b") and result.team == "blue" and result.rate_limit == 5


async def test_key_with_json_special_characters_is_encoded(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    tower = await scripted(answer({"valid": False}))
    key = 'k"e\\y{}'
    assert await validate(tower.url, key=key) == Rejection("invalid_key")
    assert json.loads(tower.requests[0][3]) == {"api_key": key}


async def test_tower_that_compresses_is_still_understood(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    async def gzip_when_allowed(_request: web.Request) -> web.Response:
        response = web.json_response({**VALID, "padding": "x" * 2000})
        response.enable_compression()
        return response

    tower = await scripted(gzip_when_allowed)
    assert isinstance(await validate(tower.url), Identity)


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("status", [200, 400, 401, 403, 404, 422, 500, 503])
async def test_valid_false_is_invalid_whatever_the_status(
    scripted: Callable[[Handler], Awaitable[Scripted]], status: int
) -> None:
    tower = await scripted(answer({"valid": False, "error": "nope"}, status))
    assert await validate(tower.url) == Rejection("invalid_key")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"valid": False, "reason": "revoked"}, "revoked_key"),
        ({"valid": False, "error": "Key expired"}, "expired_key"),
        ({"valid": False}, "invalid_key"),
    ],
)
async def test_rejection_reasons(
    scripted: Callable[[Handler], Awaitable[Scripted]], body: dict[str, Any], reason: str
) -> None:
    tower = await scripted(answer(body, 401))
    assert await validate(tower.url) == Rejection(reason)


def test_expires_at_in_the_past_is_expired() -> None:
    now = 1_700_000_000.0
    body = tower_record("k", "u", "r", expires_at=now - 1)
    assert parse_answer(200, body, now=now) == Rejection("expired_key")
    assert parse_answer(200, {**body, "expires_at": now}, now=now) == Rejection("expired_key")
    future = parse_answer(200, {**body, "expires_at": now + 1}, now=now)
    assert isinstance(future, Identity) and future.expires_at == now + 1


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    "body",
    [
        {**VALID, "expires_at": "2999-01-01T00:00:00Z"},
        {**VALID, "expires_at": str(int(time.time()) + 3600)},
        {**VALID, "expires_at": (time.time() + 3600) * 1000},  # milliseconds
        {**VALID, "expires_at": True},
        {**VALID, "expires_at": -5},
        {**VALID, "valid": "true"},
        {**VALID, "valid": 1},
        {**VALID, "key_id": 7},
        {**VALID, "user_id": None},
        {**VALID, "role": ["admin"]},
        {**VALID, "role": ""},
        {**VALID, "scopes": "tools:execute"},
        {**VALID, "scopes": [1]},
        {**VALID, "metadata": ["x"]},
        {**VALID, "user_id": "u\nforged"},
        {k: v for k, v in VALID.items() if k != "key_id"},
        {k: v for k, v in VALID.items() if k != "valid"},
        [VALID],
        "valid",
        None,
    ],
)
async def test_malformed_answers_are_faults(
    scripted: Callable[[Handler], Awaitable[Scripted]], body: Any
) -> None:
    tower = await scripted(answer(body))
    assert (await fault_of(tower.url)).kind == "malformed"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (500, "server_error"),
        (502, "server_error"),
        (401, "tower_auth"),
        (403, "tower_auth"),
        (404, "malformed"),
        (201, "malformed"),
    ],
)
async def test_status_without_a_verdict_is_a_fault(
    scripted: Callable[[Handler], Awaitable[Scripted]], status: int, kind: str
) -> None:
    tower = await scripted(answer({"error": "something"}, status))
    assert (await fault_of(tower.url)).kind == kind


async def test_valid_true_with_an_error_status_is_a_fault(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    tower = await scripted(answer(VALID, 201))
    assert (await fault_of(tower.url)).kind == "malformed"


async def test_non_json_is_a_fault(scripted: Callable[[Handler], Awaitable[Scripted]]) -> None:
    async def html(_request: web.Request) -> web.Response:
        return web.Response(text="<html>hi</html>", content_type="text/html")

    tower = await scripted(html)
    assert (await fault_of(tower.url)).kind == "malformed"


@pytest.mark.parametrize("text", ["[" * 60_000, '{"valid": ' * 20_000, "\udcff", "nul\x00"])
async def test_hostile_json_is_a_malformed_fault(
    scripted: Callable[[Handler], Awaitable[Scripted]], text: str
) -> None:
    async def hostile(_request: web.Request) -> web.Response:
        return web.Response(
            body=text.encode("utf-8", "surrogatepass"), content_type="application/json"
        )

    tower = await scripted(hostile)
    assert (await fault_of(tower.url)).kind == "malformed"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_never_followed(
    scripted: Callable[[Handler], Awaitable[Scripted]], status: int
) -> None:
    thief = await scripted(answer(VALID))

    async def redirect(_request: web.Request) -> web.Response:
        return web.Response(
            status=status,
            headers={"Location": thief.url + "/api/v1/validate"},
            text=json.dumps(VALID),
            content_type="application/json",
        )

    tower = await scripted(redirect)
    assert (await fault_of(tower.url)).kind == "redirect"
    assert thief.requests == []


async def test_huge_answer_is_bounded(scripted: Callable[[Handler], Awaitable[Scripted]]) -> None:
    tower = await scripted(answer({**VALID, "padding": "x" * (MAX_BODY + 10)}))
    assert (await fault_of(tower.url)).kind == "malformed"


async def test_endless_answer_is_cut_off(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"valid": true, "padding": "')
        while True:
            await response.write(b"x" * 8192)

    tower = await scripted(endless)
    started = time.monotonic()
    assert (await fault_of(tower.url, timeout=5)).kind == "malformed"
    assert time.monotonic() - started < 2


async def test_slow_drip_answer_hits_the_total_deadline(
    scripted: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for byte in json.dumps(VALID).encode():
            await response.write(bytes([byte]))
            await asyncio.sleep(0.1)  # each read is quick; the whole answer is not
        return response

    tower = await scripted(drip)
    started = time.monotonic()
    assert (await fault_of(tower.url, timeout=0.6)).kind == "timeout"
    assert time.monotonic() - started < 1.5


async def test_hanging_tower_times_out(scripted: Callable[[Handler], Awaitable[Scripted]]) -> None:
    async def hang(_request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    tower = await scripted(hang)
    started = time.monotonic()
    assert (await fault_of(tower.url, timeout=0.4)).kind == "timeout"
    assert time.monotonic() - started < 1.2


async def test_refused_connection_is_a_fault(unused_tcp_port: int) -> None:
    fault = await fault_of(f"http://127.0.0.1:{unused_tcp_port}")
    assert fault.kind == "refused"


async def test_ping(
    scripted: Callable[[Handler], Awaitable[Scripted]], unused_tcp_port: int
) -> None:
    tower = await scripted(answer({"service": "tower"}, 404))
    client = remote(tower.url)
    try:
        assert await client.ping() is True
    finally:
        await client.close()
    client = remote(f"http://127.0.0.1:{unused_tcp_port}")
    try:
        assert await client.ping() is False
    finally:
        await client.close()


# --------------------------------------------------------------------------- through the gateway


async def assert_503(h: Harness, started: float, limit: float = 2.0) -> None:
    response = await h.client.get("/x", headers=KEY)
    assert response.status == 503, await response.text()
    assert response.headers.get("Retry-After")
    body = await response.json()
    assert body["error"] == "tower_unavailable" and set(body) == {"error", "detail"}
    assert time.monotonic() - started < limit
    assert h.upstream.seen == []


@pytest.mark.parametrize(
    "mode", ["error500", "garbage", "wrong_types", "unauthorized", "redirect", "hang"]
)
async def test_tower_faults_are_503_and_never_forwarded(gw: Harness, mode: str) -> None:
    gw.tower.mode = mode
    await assert_503(gw, time.monotonic())  # tower.timeout is 1.0
    assert set(gw.tower.calls) == {"good-key-1"}
    if mode in ("garbage", "wrong_types", "unauthorized", "redirect"):
        assert len(gw.tower.calls) == 1  # the same answer again: not retried


async def test_gateway_credentials_refused_is_503(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(tower={"api_key": "not-the-right-tower-key"})
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    await assert_503(h, time.monotonic())
    metrics = await h.metrics()
    assert 'tower_gateway_tower_requests_total{outcome="tower_auth"} 1.0' in metrics


async def test_tower_down_is_503(make_gateway: GatewayFactory, unused_tcp_port: int) -> None:
    h = await make_gateway(tower={"url": f"http://127.0.0.1:{unused_tcp_port}"})
    await assert_503(h, time.monotonic())


async def test_invalid_answer_status_does_not_matter(gw: Harness) -> None:
    response = await gw.client.get("/x", headers={"X-API-Key": "unknown"})
    assert response.status == 401  # fake tower: 401 + valid:false


@pytest.mark.parametrize(
    ("expires_at", "status", "error"),
    [
        (-60, 401, "expired_key"),
        ("string", 503, "tower_unavailable"),
        ("ms", 503, "tower_unavailable"),
    ],
)
async def test_expires_at_through_the_gateway(
    gw: Harness, expires_at: Any, status: int, error: str
) -> None:
    if expires_at == "string":
        value: Any = str(int(time.time() + 3600))
    elif expires_at == "ms":
        value = int((time.time() + 3600) * 1000)
    else:
        value = time.time() + expires_at
    gw.tower.keys["good-key-1"]["expires_at"] = value
    response = await gw.client.get("/x", headers=KEY)
    assert response.status == status
    assert (await response.json())["error"] == error
    assert gw.upstream.seen == []
