"""Item 1: identity and JWT headers from the client never reach the upstream, in any
spelling (case, `_`, `.`), and are never read as credentials."""

from __future__ import annotations

import itertools
import json

import pytest
from aiohttp import WSMsgType
from multidict import CIMultiDict

from gateway.http.headers import GATEWAY_SET, IDENTITY_HEADERS, canonical
from tests.conftest import GatewayFactory, Harness
from tests.security.conftest import GOOD, WsUpstream, add_keys, upstream_text

# What a client could forge: what the gateway sets, what other proxies and
# frameworks trust as identity, whole families by prefix, and the JWT header.
# (X-Request-Id is left out: the contract keeps a well-formed one from the client.)
FORGEABLE = sorted(
    (GATEWAY_SET - {"x-request-id"} | IDENTITY_HEADERS)
    | {
        "x-gateway-role",
        "x-gateway-user-id",
        "x-auth-request-user",
        "x-auth-request-email",
        "x-tower-key-id",
        "x-tower-scopes",
        "authorization",
    }
)


def spellings(name: str) -> list[str]:
    """`x-forwarded-user` as a proxy on the way might also read it."""
    words = name.split("-")
    out = {name, name.upper(), "-".join(w.capitalize() for w in words)}
    for sep in ("_", "."):
        out.add(sep.join(words))
        out.add(sep.join(w.capitalize() for w in words))
        out.add(sep.join(w.upper() for w in words))
    if len(words) > 2:
        out.add(words[0] + "-" + "_".join(words[1:]))  # mixed separators
        out.add(words[0] + "." + "-".join(words[1:]))
    return sorted(out)


def batches(names: list[str], size: int = 8) -> list[list[str]]:
    """Groups small enough for aiohttp's limit of 128 header lines per request."""
    return [names[i : i + size] for i in range(0, len(names), size)]


def forged_headers(names: list[str]) -> tuple[CIMultiDict[str], dict[str, str]]:
    """Every spelling of every name, each with its own marker value."""
    headers: CIMultiDict[str] = CIMultiDict()
    markers: dict[str, str] = {}
    counter = itertools.count()
    for name in names:
        for spelling in spellings(name):
            if spelling.lower() == "authorization":
                continue  # the real one is the key source; sent separately
            marker = f"forged-{next(counter):04d}-marker"  # none is a prefix of another
            headers.add(spelling, marker)
            markers[marker] = spelling
    return headers, markers


def assert_nothing_forged(seen_headers: list[tuple[str, str]], markers: dict[str, str]) -> None:
    """No marker in any value, and every identity-like header is the gateway's own."""
    text = "\n".join(f"{k}: {v}" for k, v in seen_headers)
    assert sorted(markers[m] for m in markers if m in text) == []
    allowed = {
        "authorization",  # the gateway's JWT
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    }
    for name, _ in seen_headers:
        low = canonical(name)
        if low in GATEWAY_SET | IDENTITY_HEADERS or low.startswith(("x-gateway-", "x-auth-")):
            assert low in allowed and name.lower() == low, name


@pytest.mark.parametrize("path", ["/x", "/public/x"])
async def test_no_spelling_of_an_identity_header_reaches_the_upstream(
    gw: Harness, path: str
) -> None:
    for names in batches(FORGEABLE):
        headers, markers = forged_headers(names)
        headers["X-API-Key"] = GOOD
        headers.add("Authorization", "Bearer eyJforged.client.jwt")
        response = await gw.client.get(path, headers=headers)
        # Two Authorization values: refused, never resolved by precedence; a public
        # route reads no credentials, and forwards neither.
        assert response.status == (400 if path == "/x" else 200)
        del headers["Authorization"]
        response = await gw.client.get(path, headers=headers)
        assert response.status == 200, await response.text()
        seen = gw.upstream.seen[-1]
        pairs = [(k, v) for k, vs in seen.headers.items() for v in vs]
        assert_nothing_forged(pairs, markers)
        if path == "/x":
            (auth,) = seen.headers["authorization"]
            assert auth.startswith("Bearer ey")  # the gateway's JWT, not a client copy
        else:
            assert "authorization" not in seen.headers
    assert len(gw.upstream.seen) == len(batches(FORGEABLE)) * (1 if path == "/x" else 2)
    assert "forged.client" not in upstream_text(gw.upstream)


async def test_a_forged_jwt_on_a_public_route_is_dropped(gw: Harness) -> None:
    forged = "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJyb290In0."
    for name in ("Authorization", "authorization", "AUTHORIZATION"):
        assert (await gw.client.get("/public/x", headers={name: forged})).status == 200
        assert "authorization" not in gw.upstream.seen[-1].headers
    assert gw.tower.calls == []


async def test_a_custom_jwt_header_is_stripped_in_every_spelling(
    make_gateway: GatewayFactory,
) -> None:
    h = await make_gateway(jwt={"header": "X-Internal-Token"})
    add_keys(h.tower)
    for path in ("/x", "/public/x"):
        headers, markers = forged_headers(["x-internal-token"])
        headers["X-API-Key"] = GOOD
        assert (await h.client.get(path, headers=headers)).status == 200
        seen = h.upstream.seen[-1]
        values = [v for vs in seen.headers.values() for v in vs]
        assert not any(m in v for v in values for m in markers), path
        tokens = seen.headers.get("x-internal-token", [])
        assert len(tokens) == (1 if path == "/x" else 0)
        assert all(t.startswith("Bearer ey") for t in tokens)


@pytest.mark.parametrize(
    "name", ["X_Api_Key", "x_api_key", "X.Api.Key", "X-Api_Key", "X_API_KEY", "x.api-key"]
)
async def test_a_lookalike_key_header_is_never_a_credential(gw: Harness, name: str) -> None:
    response = await gw.client.get("/x", headers={name: GOOD})
    assert response.status == 401
    assert (await response.json())["error"] == "missing_key"
    assert gw.tower.calls == []
    assert gw.upstream.seen == []
    # On a public route it is dropped, not forwarded.
    assert (await gw.client.get("/public/x", headers={name: GOOD})).status == 200
    assert GOOD not in json.dumps(gw.upstream.seen[-1].headers)


@pytest.mark.parametrize("name", ["Authorization_", "X-Authorization", "Proxy-Authorization"])
async def test_an_authorization_lookalike_is_never_a_credential(gw: Harness, name: str) -> None:
    response = await gw.client.get("/x", headers={name: f"Bearer {GOOD}"})
    assert response.status == 401
    assert gw.tower.calls == []


async def test_no_spelling_of_an_identity_header_reaches_a_websocket_upstream(
    wsg: Harness, ws_upstream: WsUpstream
) -> None:
    for names in batches(FORGEABLE):
        headers, markers = forged_headers(names)
        headers["X-API-Key"] = GOOD
        ws = await wsg.client.ws_connect("/chat", headers=headers)
        await ws.send_str("hello")
        assert (await ws.receive(timeout=3)).type is WSMsgType.TEXT
        await ws.close()
        assert_nothing_forged(ws_upstream.handshakes[-1].headers, markers)
    assert len(ws_upstream.handshakes) == len(batches(FORGEABLE))
