"""Item 2: a request that carries its credentials ambiguously is refused (400) before any
tower call; the gateway never validates one value and forwards another."""

from __future__ import annotations

import jwt
import pytest

from tests.conftest import Harness
from tests.security.conftest import ADMIN, GOOD, exchange, request_bytes, upstream_text

AMBIGUOUS = {
    "two_bearer_keys": [("Authorization", f"Bearer {GOOD}"), ("Authorization", f"Bearer {ADMIN}")],
    "the_same_bearer_twice": [("Authorization", f"Bearer {GOOD}")] * 2,
    "basic_beside_bearer": [
        ("Authorization", "Basic dXNlcjpwdw=="),
        ("Authorization", f"Bearer {GOOD}"),
    ],
    "x_api_key_and_a_different_bearer": [("X-API-Key", GOOD), ("Authorization", f"Bearer {ADMIN}")],
    "x_api_key_and_a_different_apikey": [("X-API-Key", ADMIN), ("Authorization", f"ApiKey {GOOD}")],
    "x_api_key_twice": [("X-API-Key", GOOD), ("X-API-Key", ADMIN)],
    "x_api_key_twice_in_other_cases": [("X-API-Key", GOOD), ("x-api-key", GOOD)],
    "two_keys_in_one_value": [("X-API-Key", f"{GOOD}, {ADMIN}")],
}


@pytest.mark.parametrize("name", sorted(AMBIGUOUS))
async def test_ambiguous_credentials_are_400_without_a_tower_call(gw: Harness, name: str) -> None:
    # Raw bytes: aiohttp's client would merge `X-API-Key` and `x-api-key`.
    assert gw.client.port is not None
    answer = await exchange(gw.client.port, request_bytes("/x", *AMBIGUOUS[name]))
    assert answer.status == 400, answer.raw
    body = answer.first.json()
    assert body["error"] in {"repeated_key", "conflicting_keys", "malformed_key"}
    assert GOOD not in body["detail"] and ADMIN not in body["detail"]
    assert gw.tower.calls == []
    assert gw.upstream.seen == []


async def test_the_same_key_in_both_sources_is_one_key(gw: Harness) -> None:
    response = await gw.client.get(
        "/x", headers={"X-API-Key": GOOD, "Authorization": f"ApiKey {GOOD}"}
    )
    assert response.status == 200
    assert gw.tower.calls == [GOOD]
    assert GOOD not in upstream_text(gw.upstream)


async def test_pipelined_requests_never_share_an_identity(gw: Harness) -> None:
    # One connection, an admin key first, then an operator key, then none: each
    # request is judged on its own credentials, and each JWT names its own caller.
    assert gw.client.port is not None
    answer = await exchange(
        gw.client.port,
        request_bytes("/admin/a", ("Authorization", f"Bearer {ADMIN}"), close=False)
        + request_bytes("/admin/b", ("Authorization", f"Bearer {GOOD}"), close=False)
        + request_bytes("/admin/c"),
    )
    assert [r.status for r in answer.replies] == [200, 403, 401]
    (seen,) = gw.upstream.seen
    auth = seen.header("authorization")
    assert seen.path == "/admin/a" and auth is not None
    assert jwt.decode(auth.split()[1], options={"verify_signature": False})["sub"] == "u2"
    assert gw.tower.calls == [ADMIN, GOOD]


@pytest.mark.parametrize(
    "head",
    [
        b"GET /x HTTP/1.1\r\nHost: gw\r\nHost: evil.example\r\n",
        b"GET /x HTTP/1.1\r\nHost: gw\r\nhost: gw\r\n",
        b"GET /x HTTP/1.1\r\nHost: gw, evil.example\r\n",
        b"GET /x HTTP/1.1\r\nHost: gw/admin\r\n",
        b"GET /x HTTP/1.1\r\nHost: user@gw\r\n",
        b"GET /x HTTP/1.1\r\n",
        b"GET http://evil.example/x HTTP/1.1\r\nHost: gw\r\n",
    ],
    ids=[
        "two_hosts",
        "same_host_twice",
        "host_list",
        "host_with_a_path",
        "host_with_userinfo",
        "no_host_in_http11",
        "absolute_form_authority",
    ],
)
async def test_a_duplicated_or_contradicted_host_is_400(gw: Harness, head: bytes) -> None:
    assert gw.client.port is not None
    request = head + b"X-API-Key: " + GOOD.encode() + b"\r\nConnection: close\r\n\r\n"
    answer = await exchange(gw.client.port, request)
    assert answer.closed
    assert answer.status == 400, answer.raw
    assert answer.first.json()["error"] in {"malformed_request", "bad_path"}
    assert answer.first.header("X-Request-Id")
    assert (answer.first.header("Content-Type") or "").startswith("application/json")
    assert gw.tower.calls == []
    assert gw.upstream.seen == []


@pytest.mark.parametrize("host", ["gw", "gw:8080", "10.0.0.1:80", "[::1]:8080", "a-b.example."])
async def test_a_single_well_formed_host_is_fine(gw: Harness, host: str) -> None:
    assert gw.client.port is not None
    request = request_bytes("/x", ("X-API-Key", GOOD)).replace(
        b"Host: gw", f"Host: {host}".encode()
    )
    answer = await exchange(gw.client.port, request)
    assert answer.status == 200
    assert gw.upstream.seen[-1].header("x-forwarded-host") == host
