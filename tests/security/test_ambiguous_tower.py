"""Class 5: a tower answer that repeats a JSON member is a fault (never the first or the
last of the two), and answers a client's own key can provoke (any 4xx) never open the
circuit breaker for other keys."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import GatewayFactory, Scripted, tower_record

GOOD_RECORD = json.dumps(tower_record("k1", "u1", "admin"))[1:-1]

REPEATS = [
    '{"valid": false, "reason": "invalid", "valid": true, ' + GOOD_RECORD + "}",
    "{" + GOOD_RECORD + ', "valid": false}',
    "{" + GOOD_RECORD + ', "role": "admin"}',
    "{" + GOOD_RECORD.replace('"role": "admin"', '"role": "viewer", "role": "admin"') + "}",
    '{"valid": true, "\\u0076alid": false}',
    "{" + GOOD_RECORD + ', "metadata": {"a": 1, "a": 2}}',
]


@pytest.fixture
async def scripted_tower(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> Scripted:
    tower = Scripted()
    server = await aiohttp_server(tower.app(), host="127.0.0.1")
    tower.url = str(server.make_url("")).rstrip("/")
    return tower


def answering(text: str, status: int = 200) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(text=text, status=status, content_type="application/json")

    return handler


def breaking(tower: Scripted) -> dict[str, object]:
    """Tower settings whose circuit opens after two faults and stays open."""
    return {"url": tower.url, "timeout": 0.6, "retries": 0, "breaker_threshold": 2,
            "breaker_reset": 60}


@pytest.mark.parametrize("body", REPEATS)
@pytest.mark.parametrize("status", [200, 401, 422])
async def test_a_repeated_member_is_a_tower_fault(
    make_gateway: GatewayFactory, scripted_tower: Scripted, body: str, status: int
) -> None:
    h = await make_gateway(tower={"url": scripted_tower.url, "timeout": 0.6, "retries": 0})
    scripted_tower.handler = answering(body, status)
    response = await h.client.get("/admin/x", headers={"X-API-Key": "some-key-123"})
    assert response.status == 503, await response.text()
    assert (await response.json())["error"] == "tower_unavailable"
    assert h.upstream.seen == []


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 429, 451])
async def test_4xx_answers_for_one_key_never_open_the_circuit(
    make_gateway: GatewayFactory, scripted_tower: Scripted, status: int
) -> None:
    h = await make_gateway(tower=breaking(scripted_tower))
    good = json.dumps(tower_record("k1", "u1", "admin"))

    async def handler(request: web.Request) -> web.Response:
        key = (await request.json())["api_key"]
        if key.startswith("bad-"):
            return web.Response(text='{"error": "unparseable key"}', status=status)
        return web.Response(text=good, content_type="application/json")

    scripted_tower.handler = handler
    for i in range(10):
        response = await h.client.get("/x", headers={"X-API-Key": f"bad-key-{i:04d}"})
        assert response.status == 503
    response = await h.client.get("/x", headers={"X-API-Key": "fresh-key-0001"})
    assert response.status == 200, await response.text()


async def test_5xx_answers_still_open_the_circuit(
    make_gateway: GatewayFactory, scripted_tower: Scripted
) -> None:
    h = await make_gateway(tower=breaking(scripted_tower))
    scripted_tower.handler = answering('{"error": "down"}', 500)
    for i in range(3):
        await h.client.get("/x", headers={"X-API-Key": f"any-key-{i:04d}"})
    calls = len(scripted_tower.requests)
    scripted_tower.handler = None
    response = await h.client.get("/x", headers={"X-API-Key": "fresh-key-0001"})
    assert response.status == 503
    assert len(scripted_tower.requests) == calls  # not even asked: the circuit is open
