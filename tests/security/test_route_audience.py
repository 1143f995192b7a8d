"""Class 7: `routes[].audience` (default `jwt.audience`): a token minted for one route's
audience is never sent to a route of another, and the reused-token cache is keyed by it."""

from __future__ import annotations

import jwt
import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from tests.conftest import ENV, GatewayFactory, Harness
from tests.security.conftest import ADMIN, add_keys


@pytest.fixture
async def aud(make_gateway: GatewayFactory) -> Harness:
    h = await make_gateway(
        routes=[
            {"path": "/billing", "upstream": "http://127.0.0.1:1", "audience": "billing"},
            {"path": "/legacy", "upstream": "http://127.0.0.1:1", "audience": "legacy"},
            {"path": "/", "upstream": "http://127.0.0.1:1"},
        ]
    )
    for route in h.gateway.components.routes.routes:
        object.__setattr__(route, "upstream_origin", h.upstream.url)
    add_keys(h.tower)
    return h


def claims_of(h: Harness) -> list[dict[str, object]]:
    out = []
    for seen in h.upstream.seen:
        auth = seen.header("authorization")
        assert auth is not None
        out.append(jwt.decode(auth.split()[1], options={"verify_signature": False}))
    return out


async def test_each_route_gets_tokens_of_its_own_audience(aud: Harness) -> None:
    for path in ("/billing/a", "/legacy/a", "/x", "/billing/b", "/legacy/b", "/y"):
        response = await aud.client.get(path, headers={"X-API-Key": ADMIN})
        assert response.status == 200
    claims = claims_of(aud)
    assert [c["aud"] for c in claims] == ["billing", "legacy", "internal"] * 2
    # Reused per key and audience: the same token (same jti) for the same audience,
    # never one audience's token for another.
    assert claims[0]["jti"] == claims[3]["jti"] and claims[1]["jti"] == claims[4]["jti"]
    assert len({c["jti"] for c in claims}) == 3
    assert aud.gateway.minter.minted == 3


async def test_a_token_for_one_audience_fails_verification_for_another(aud: Harness) -> None:
    await aud.client.get("/billing/a", headers={"X-API-Key": ADMIN})
    token = (aud.upstream.seen[0].header("authorization") or "").split()[1]
    secret = aud.gateway.signing_key.key
    assert isinstance(secret, bytes)
    jwt.decode(token, secret, algorithms=["HS256"], audience="billing")
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, secret, algorithms=["HS256"], audience="legacy")


def test_an_audience_must_be_printable() -> None:
    for bad in ("", "has space", "x" * 257, "tab\there"):
        with pytest.raises(ConfigError, match="audience"):
            parse_config(
                {"routes": [{"path": "/", "upstream": "http://u:1", "audience": bad}]}, env=ENV
            )
