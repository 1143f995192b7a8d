"""Class 2: the client's key reaches the upstream in no form: not in a query parameter of
any name (as sent or %-encoded, once or twice), not in a cookie or other header, not in a
WebSocket subprotocol, and no close reason echoes it."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import aiohttp
import pytest

from tests.conftest import Harness
from tests.security.conftest import (
    ADMIN,
    GOOD,
    WsUpstream,
    exchange,
    request_bytes,
    upstream_text,
)


def encodings(key: str) -> list[str]:
    every = "".join(f"%{ord(c):02x}" for c in key)
    return [
        key,
        quote(key, safe=""),
        every,
        every.upper(),
        key[:4] + "".join(f"%{ord(c):02X}" for c in key[4:]),
        quote(every, safe=""),  # twice
    ]


@pytest.mark.parametrize("name", ["token", "access_token", "key", "auth", "x", "API_KEY_2"])
@pytest.mark.parametrize("route", ["/public/a", "/x"])
async def test_a_key_in_a_query_parameter_of_any_name_is_refused(
    gw: Harness, name: str, route: str
) -> None:
    assert gw.client.port is not None
    for spelled in encodings(GOOD):
        answer = await exchange(
            gw.client.port, request_bytes(f"{route}?a=1&{name}={spelled}", ("X-API-Key", GOOD))
        )
        assert answer.status == 400, (spelled, answer.raw)
        assert answer.first.json()["error"] == "key_in_query"
        assert GOOD.encode() not in answer.raw
    assert gw.upstream.seen == []


async def test_a_key_in_a_cookie_or_other_header_never_reaches_the_upstream(gw: Harness) -> None:
    assert gw.client.port is not None
    for spelled in encodings(ADMIN):
        answer = await exchange(
            gw.client.port,
            request_bytes(
                "/admin/x",
                ("Authorization", f"Bearer {ADMIN}"),
                ("Cookie", f"session=1; token={spelled}"),
                ("X-Forward-This", f"prefix-{spelled}-suffix"),
            ),
        )
        assert answer.status == 200, answer.raw
    text = upstream_text(gw.upstream)
    for spelled in encodings(ADMIN):
        assert spelled not in text
    assert all(seen.header("cookie") is None for seen in gw.upstream.seen)


async def test_an_unrelated_query_still_goes_through(gw: Harness) -> None:
    response = await gw.client.get("/x?token=something-else&q=1", headers={"X-API-Key": GOOD})
    assert response.status == 200
    assert gw.upstream.seen[-1].path == "/x?token=something-else&q=1"


@pytest.mark.parametrize(
    "protocols",
    [
        ["chat", GOOD],
        [f"bearer.{GOOD}", "chat"],
        ["chat", quote("".join(f"%{ord(c):02x}" for c in GOOD), safe="")],
    ],
)
async def test_a_key_offered_as_a_subprotocol_never_reaches_the_upstream(
    wsg: Harness, ws_upstream: WsUpstream, protocols: list[str]
) -> None:
    async with wsg.client.ws_connect(
        "/ws", headers={"X-API-Key": GOOD}, protocols=protocols
    ) as ws:
        await ws.send_str("hi")
        assert (await ws.receive()).data == "hi"
        assert GOOD not in (ws.protocol or "")
    assert ws_upstream.handshakes
    assert GOOD not in ws_upstream.everything()
    offered = [
        v for seen in ws_upstream.handshakes for k, v in seen.headers
        if k.lower() == "sec-websocket-protocol"
    ]
    assert all("chat" in v for v in offered)


async def test_first_message_auth_with_the_key_as_subprotocol_ends_without_echo(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    # A browser cannot set headers: it offers the key as a subprotocol and sends it
    # again in the auth message. The gateway had to answer the offer before it knew
    # the key; once it does, the connection ends, and the upstream saw nothing.
    async with wsg.client.ws_connect("/ws", protocols=[GOOD]) as ws:
        await ws.send_str(json.dumps({"type": "auth", "api_key": GOOD}))
        texts = []
        while True:
            msg = await asyncio.wait_for(ws.receive(), 5)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            texts.append(msg.data)
        assert ws.close_code == 4400
        assert GOOD not in (msg.extra or "")
    assert ws_upstream.handshakes == []
    assert all(GOOD not in t for t in texts)


async def test_a_subprotocol_mismatch_close_reason_names_no_protocol(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    offer = "x-secret-offer-value-1234"
    async with wsg.client.ws_connect("/ws", protocols=[offer]) as ws:
        await ws.send_str(json.dumps({"type": "auth", "api_key": GOOD}))
        while True:
            msg = await asyncio.wait_for(ws.receive(), 5)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
        assert offer not in (msg.extra or "")
