"""Class 6: responses the gateway makes carry `X-Content-Type-Options: nosniff`, no
`Server` version string, and never echo the request path."""

from __future__ import annotations

import pytest

from tests.conftest import GatewayFactory, Harness
from tests.security.conftest import GOOD, exchange, request_bytes

MARK = "zq-echo-marker-77"

CASES = [
    request_bytes(f"/admin/{MARK}"),  # 401
    request_bytes(f"/admin/{MARK}", ("X-API-Key", GOOD)),  # 403
    request_bytes(f"/public/{MARK}/%00"),  # 400 bad_path
    request_bytes(f"/{MARK}", method="TRACE"),  # 405
    request_bytes(f"/{MARK}", ("Expect", "weird")),  # 417
    f"GET /{MARK} HTTP/1.1\r\nHost: gw\r\nBad Header: x\r\n\r\n".encode(),  # parser 400
]


@pytest.mark.parametrize("raw", CASES)
async def test_gateway_made_answers_are_hygienic(gw: Harness, raw: bytes) -> None:
    assert gw.client.port is not None
    answer = await exchange(gw.client.port, raw)
    reply = answer.first
    assert reply.status >= 400
    assert reply.header("X-Content-Type-Options") == "nosniff"
    server = reply.header("Server") or ""
    assert "aiohttp" not in server.lower() and "python" not in server.lower()
    assert MARK.encode() not in answer.raw


async def test_404_names_neither_path_nor_method(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(
        routes=[{"path": "/only", "upstream": "http://127.0.0.1:1", "methods": ["GET"]}]
    )
    assert h.client.port is not None
    for raw in (request_bytes(f"/{MARK}"), request_bytes(f"/only/{MARK}", method="PUT")):
        answer = await exchange(h.client.port, raw)
        assert answer.status == 404
        assert MARK.encode() not in answer.raw and b"PUT" not in answer.first.body
        assert answer.first.header("X-Content-Type-Options") == "nosniff"


async def test_proxied_and_ops_answers_carry_no_version(gw: Harness) -> None:
    response = await gw.client.get("/public/x")
    assert "aiohttp" not in response.headers.get("Server", "")
    for path in ("/healthz", "/metrics", "/admin/cache"):
        response = await gw.ops.get(path)
        assert "aiohttp" not in response.headers.get("Server", "")
        assert response.headers.get("X-Content-Type-Options") == "nosniff", path
