"""Item 3: the client's key never reaches the upstream, on any path: success, 401, 403,
429, 503, WebSocket (header and first-message auth), and public routes."""

from __future__ import annotations

import json

import pytest
from aiohttp import WSMsgType

from tests.conftest import GatewayFactory, Harness
from tests.security.conftest import ADMIN, GOOD, WsUpstream, add_keys, upstream_text


def echoes(key: str) -> dict[str, str]:
    """The key again, in headers the gateway does not read: clients do send such copies."""
    return {
        "Api-Key": key,
        "X-Key": key,
        "Cookie": f"session=1; api_key={key}",
        "X-Debug": f"key={key}",
    }


ECHOES = echoes(GOOD)


def assert_no_key(h: Harness, *keys: str) -> None:
    text = upstream_text(h.upstream)
    for key in keys:
        assert key not in text


@pytest.mark.parametrize(
    "source",
    [{"X-API-Key": GOOD}, {"Authorization": f"Bearer {GOOD}"}, {"Authorization": f"ApiKey {GOOD}"}],
    ids=["x-api-key", "bearer", "apikey"],
)
async def test_success_forwards_a_jwt_and_no_key(gw: Harness, source: dict[str, str]) -> None:
    response = await gw.client.get("/x?q=1", headers={**source, **ECHOES})
    assert response.status == 200
    (seen,) = gw.upstream.seen
    assert (seen.header("authorization") or "").startswith("Bearer ey")
    assert seen.header("x-api-key") is None
    assert seen.header("cookie") is None and seen.header("api-key") is None
    assert_no_key(gw, GOOD)


async def test_a_key_in_a_header_the_gateway_does_not_read_is_not_forwarded_either(
    make_gateway: GatewayFactory,
) -> None:
    # Authorization is neither a key source nor the JWT header here: a client that
    # sends its key there as well must not hand it to the upstream.
    h = await make_gateway(credentials={"sources": ["x-api-key"]}, jwt={"header": "X-Jwt"})
    add_keys(h.tower)
    response = await h.client.get(
        "/x", headers={"X-API-Key": GOOD, "Authorization": f"Bearer {GOOD}"}
    )
    assert response.status == 200
    (seen,) = h.upstream.seen
    assert seen.header("authorization") is None
    assert (seen.header("x-jwt") or "").startswith("Bearer ey")
    assert_no_key(h, GOOD)
    # An unrelated Authorization (not carrying the key) still goes through.
    await h.client.get("/x", headers={"X-API-Key": GOOD, "Authorization": "Basic dTpw"})
    assert h.upstream.seen[-1].header("authorization") == "Basic dTpw"


async def test_denials_forward_nothing(make_gateway: GatewayFactory) -> None:
    h = await make_gateway()
    add_keys(h.tower)
    h.tower.add("limited-key-1", key_id="k3", user_id="u3", role="operator", rate_limit=1)
    cases = [
        ("/x", "invalid-key-99", 401),
        ("/admin/x", GOOD, 403),
        ("/x", "limited-key-1", 200),
        ("/x", "limited-key-1", 429),
    ]
    for path, key, status in cases:
        response = await h.client.get(path, headers={"X-API-Key": key, **echoes(key)})
        assert response.status == status, path
        assert key not in await response.text()
    h.tower.mode = "error500"
    response = await h.client.get(
        "/x", headers={"X-API-Key": "unknown-key-77", **echoes("unknown-key-77")}
    )
    assert response.status == 503
    assert len(h.upstream.seen) == 1  # only the one allowed request
    assert_no_key(h, GOOD, "invalid-key-99", "limited-key-1", "unknown-key-77")


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": GOOD, **echoes(GOOD)},
        {"Authorization": f"Bearer {GOOD}", **echoes(GOOD)},
        {"X-API-Key": GOOD, "Authorization": f"Bearer {ADMIN}", **echoes(ADMIN)},  # two keys
        {"X_Api_Key": GOOD, "X.Api.Key": ADMIN},
    ],
    ids=["x-api-key", "bearer", "two", "lookalikes"],
)
async def test_public_routes_neither_validate_nor_forward_keys(
    gw: Harness, headers: dict[str, str]
) -> None:
    response = await gw.client.get("/public/x", headers=headers)
    assert response.status == 200
    assert gw.tower.calls == []
    assert_no_key(gw, GOOD, ADMIN)


async def test_websocket_header_auth_forwards_no_key(wsg: Harness, ws_upstream: WsUpstream) -> None:
    ws = await wsg.client.ws_connect("/chat", headers={"X-API-Key": GOOD, **ECHOES})
    await ws.send_str("hello")
    assert (await ws.receive(timeout=3)).data == "hello"
    await ws.close()
    assert GOOD not in ws_upstream.everything()


async def test_websocket_first_message_key_is_consumed_not_relayed(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    # A browser cannot set headers, but it does send its cookies.
    ws = await wsg.client.ws_connect("/chat", headers={"Cookie": f"api_key={GOOD}"})
    await ws.send_str(json.dumps({"type": "auth", "api_key": GOOD}))
    answer = await ws.receive(timeout=3)
    assert json.loads(answer.data)["type"] == "auth_ok"
    await ws.send_str("hello")
    assert (await ws.receive(timeout=3)).data == "hello"
    await ws.close()
    assert ws_upstream.received == ["hello"]
    assert GOOD not in ws_upstream.everything()


async def test_websocket_failures_forward_nothing(wsg: Harness, ws_upstream: WsUpstream) -> None:
    ws = await wsg.client.ws_connect("/chat")
    await ws.send_str(json.dumps({"type": "auth", "api_key": "invalid-key-99"}))
    assert json.loads((await ws.receive(timeout=3)).data)["type"] == "error"
    assert (await ws.receive(timeout=3)).type is WSMsgType.CLOSE
    response = await wsg.client.get(
        "/chat",
        headers={
            "X-API-Key": "invalid-key-99",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        },
    )
    assert response.status == 401
    assert ws_upstream.handshakes == []


async def test_public_websocket_forwards_no_key(wsg: Harness, ws_upstream: WsUpstream) -> None:
    ws = await wsg.client.ws_connect("/open/feed", headers={"X-API-Key": GOOD, **ECHOES})
    await ws.send_str("hi")
    assert (await ws.receive(timeout=3)).data == "hi"
    await ws.close()
    assert wsg.tower.calls == []
    assert GOOD not in ws_upstream.everything()
