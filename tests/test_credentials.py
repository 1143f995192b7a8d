"""Where keys are read from, and every way a request's credentials are refused before the tower."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import ClientResponse
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.auth.credentials import CredentialExtractor
from gateway.errors import BadRequest
from tests.conftest import GatewayFactory, Harness

GOOD = "good-key-1"


async def error(response: ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    body: dict[str, Any] = await response.json()
    assert body["error"] == code
    assert set(body) == {"error", "detail"}
    assert response.headers.get("X-Request-Id")
    return body


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": GOOD},
        {"x-api-key": GOOD},
        {"Authorization": f"Bearer {GOOD}"},
        {"Authorization": f"bearer {GOOD}"},
        {"Authorization": f"ApiKey {GOOD}"},
        {"X-API-Key": GOOD, "Authorization": f"Bearer {GOOD}"},  # the same key twice is one key
    ],
)
async def test_key_sources(gw: Harness, headers: dict[str, str]) -> None:
    response = await gw.client.get("/x", headers=headers)
    assert response.status == 200, await response.text()
    assert gw.tower.calls == [GOOD]
    seen = gw.upstream.seen[-1]
    # The key itself never travels on; the Authorization the upstream sees is the JWT.
    assert seen.header("x-api-key") is None
    auth = seen.header("authorization")
    assert auth is not None and auth.startswith("Bearer ey") and GOOD not in auth


async def test_basic_authorization_is_not_a_key(gw: Harness) -> None:
    response = await gw.client.get("/x", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    await error(response, 401, "missing_key")
    assert gw.tower.calls == []


async def test_basic_authorization_beside_a_key_is_not_a_conflict(gw: Harness) -> None:
    response = await gw.client.get(
        "/x", headers={"X-API-Key": GOOD, "Authorization": "Basic dXNlcjpwYXNz"}
    )
    assert response.status == 200
    assert gw.tower.calls == [GOOD]


# --------------------------------------------------------------------------- refused, no tower call


async def test_two_different_keys_are_refused(gw: Harness) -> None:
    response = await gw.client.get(
        "/x", headers={"X-API-Key": GOOD, "Authorization": "Bearer admin-key-1"}
    )
    await error(response, 400, "conflicting_keys")
    assert gw.tower.calls == []
    assert gw.upstream.seen == []


async def test_repeated_key_header_is_refused(gw: Harness) -> None:
    headers = CIMultiDict([("X-API-Key", GOOD), ("X-API-Key", GOOD)])
    response = await gw.client.get("/x", headers=headers)
    await error(response, 400, "repeated_key")
    headers = CIMultiDict(
        [("Authorization", f"Bearer {GOOD}"), ("Authorization", "Bearer admin-key-1")]
    )
    response = await gw.client.get("/x", headers=headers)
    await error(response, 400, "repeated_key")
    assert gw.tower.calls == []


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": "abc def"},
        {"X-API-Key": "abc\tdef"},
        {"X-API-Key": "k\u00e9y"},
        {"X-API-Key": "k" * 513},
        {"Authorization": "Bearer two words"},
        {"Authorization": "Bearer"},
        {"Authorization": "ApiKey " + "k" * 600},
    ],
)
async def test_malformed_keys_are_refused_without_a_tower_call(
    gw: Harness, headers: dict[str, str]
) -> None:
    response = await gw.client.get("/x", headers=headers)
    await error(response, 400, "malformed_key")
    assert gw.tower.calls == []
    assert gw.upstream.seen == []


async def test_key_of_the_maximum_length_is_read(gw: Harness) -> None:
    key = "k" * 512
    response = await gw.client.get("/x", headers={"X-API-Key": key})
    await error(response, 401, "invalid_key")
    assert gw.tower.calls == [key]


@pytest.mark.parametrize("name", ["X_Api_Key", "X.Api.Key", "x_api_key", "X-Api_Key"])
async def test_lookalike_header_names_are_never_keys(gw: Harness, name: str) -> None:
    response = await gw.client.get("/x", headers={name: GOOD})
    await error(response, 401, "missing_key")
    assert gw.tower.calls == []
    # ... and never reach the upstream, even on a public route.
    response = await gw.client.get("/public/x", headers={name: GOOD})
    assert response.status == 200
    seen = gw.upstream.seen[-1]
    assert all(GOOD not in v for values in seen.headers.values() for v in values)


async def test_lookalike_header_beside_a_real_key_is_dropped(gw: Harness) -> None:
    response = await gw.client.get("/x", headers={"X-API-Key": GOOD, "X_Api_Key": "admin-key-1"})
    assert response.status == 200
    assert gw.tower.calls == [GOOD]
    seen = gw.upstream.seen[-1]
    assert all("admin-key-1" not in v for values in seen.headers.values() for v in values)


@pytest.mark.parametrize(
    "query",
    [
        "api_key=good-key-1",
        "x=1&API_KEY=good-key-1",
        "apikey=good-key-1",
        "api-key=good-key-1",
        "api%5Fkey=good-key-1",
        "api%5fKEY=good-key-1",
        "api_key",
        "a=1;api_key=good-key-1",
        "api+key=good-key-1",
    ],
)
async def test_key_in_query_is_refused(gw: Harness, query: str) -> None:
    for path in ("/x", "/public/x"):
        # encoded=True: the query goes out exactly as written, escapes included.
        url = URL(f"{str(gw.client.make_url('')).rstrip('/')}{path}?{query}", encoded=True)
        response = await gw.client.session.get(url, headers={"X-API-Key": GOOD})
        await error(response, 400, "key_in_query")
    assert gw.tower.calls == []
    assert gw.upstream.seen == []


async def test_missing_key_says_which_headers_are_read(gw: Harness) -> None:
    response = await gw.client.get("/x")
    body = await error(response, 401, "missing_key")
    assert "X-API-Key" in body["detail"] and "Authorization" in body["detail"]
    challenge = response.headers.get("WWW-Authenticate")
    assert challenge is not None and "Bearer" in challenge
    assert gw.tower.calls == []


async def test_sources_restrict_where_keys_are_read(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(credentials={"sources": ["x-api-key"]})
    h.tower.add(GOOD, key_id="k1", user_id="u1", role="operator")
    response = await h.client.get("/x", headers={"Authorization": f"Bearer {GOOD}"})
    body = await error(response, 401, "missing_key")
    assert "X-API-Key" in body["detail"] and "Authorization" not in body["detail"]
    # A bearer value on an unused source is still never forwarded as-is.
    response = await h.client.get(
        "/x", headers={"X-API-Key": GOOD, "Authorization": "Bearer admin-key-1"}
    )
    assert response.status == 200
    assert "admin-key-1" not in (h.upstream.seen[-1].header("authorization") or "")
    assert h.tower.calls == [GOOD]


async def test_invalid_key_is_401_with_a_challenge(gw: Harness) -> None:
    response = await gw.client.get("/x", headers={"X-API-Key": "nobody-knows-me"})
    await error(response, 401, "invalid_key")
    assert response.headers.get("WWW-Authenticate")
    assert gw.upstream.seen == []


# --------------------------------------------------------------------------- the extractor itself


def headers_of(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_extractor_not_mine_is_none() -> None:
    extractor = CredentialExtractor(["x-api-key", "authorization"])
    assert extractor.extract(headers_of()) is None
    assert extractor.extract(headers_of(("Authorization", "Digest abc"))) is None
    assert extractor.extract(headers_of(("X-API-Key", "  k1  "))) == "k1"


def test_extractor_refuses_empty_and_conflicting() -> None:
    extractor = CredentialExtractor(["authorization", "x-api-key"], max_length=8)
    with pytest.raises(BadRequest) as info:
        extractor.extract(headers_of(("X-API-Key", "a"), ("Authorization", "ApiKey b")))
    assert info.value.reason == "conflicting_keys"
    with pytest.raises(BadRequest) as info:
        extractor.extract(headers_of(("X-API-Key", "123456789")))
    assert info.value.reason == "malformed_key"
    assert extractor.extract(headers_of(("X-API-Key", "12345678"))) == "12345678"
