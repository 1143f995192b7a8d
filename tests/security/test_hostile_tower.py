"""Item 8: a hostile or broken tower. Redirects are not followed (the tower secret never
leaves its origin), bodies are read bounded and under one total deadline, and no answer,
however malformed or clever, yields a broader identity than the tower granted.

tests/test_tower_client.py covers the client alone (every redirect status, the byte
bound, the slow drip); here the same answers go through the whole gateway.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.auth.capabilities import CapabilityMapper
from gateway.config import parse_config
from gateway.tower import Identity
from tests.conftest import (
    ENV,
    JWT_SECRET,
    TOWER_SECRET,
    GatewayFactory,
    Handler,
    Harness,
    Scripted,
    tower_record,
)

KEY = {"X-API-Key": "client-key-1"}


def answer(body: Any, status: int = 200) -> Handler:
    async def handler(_request: web.Request) -> web.Response:
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(text=text, status=status, content_type="application/json")

    return handler


@pytest.fixture
async def scripted(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> Callable[[], Awaitable[Scripted]]:
    async def make() -> Scripted:
        tower = Scripted()
        server = await aiohttp_server(tower.app(), host="127.0.0.1")
        tower.url = str(server.make_url("")).rstrip("/")
        return tower

    return make


@pytest.fixture
async def towered(
    make_gateway: GatewayFactory, scripted: Callable[[], Awaitable[Scripted]]
) -> tuple[Harness, Scripted]:
    tower = await scripted()
    h = await make_gateway(tower={"url": tower.url, "timeout": 0.6, "retries": 0})
    return h, tower


# --------------------------------------------------------------------------- transport


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_a_fault_and_the_thief_sees_nothing(
    towered: tuple[Harness, Scripted], scripted: Callable[[], Awaitable[Scripted]], status: int
) -> None:
    h, tower = towered
    thief = await scripted()

    async def redirect(_request: web.Request) -> web.Response:
        # Says "valid" too: a redirect is never an answer, whatever it carries.
        return web.Response(
            status=status,
            headers={"Location": thief.url + "/api/v1/validate"},
            text=json.dumps(tower_record("k1", "u1", "admin")),
            content_type="application/json",
        )

    tower.handler = redirect
    response = await h.client.get("/x", headers=KEY)
    assert response.status == 503
    assert len(tower.requests) == 1
    assert thief.requests == []
    assert h.upstream.seen == []


async def test_a_huge_answer_is_cut_off_and_is_a_fault(towered: tuple[Harness, Scripted]) -> None:
    h, tower = towered

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(
            b'{"valid": true, "key_id": "k1", "user_id": "u1", "role": "admin", "x": "'
        )
        for _ in range(10_000):  # 80 MB unless the gateway stops reading
            await response.write(b"x" * 8192)
        return response

    tower.handler = endless
    started = time.monotonic()
    response = await h.client.get("/x", headers=KEY)
    assert response.status == 503
    assert time.monotonic() - started < 2
    assert h.upstream.seen == []


async def test_a_slow_drip_answer_hits_one_total_deadline(
    towered: tuple[Harness, Scripted],
) -> None:
    h, tower = towered

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for byte in json.dumps(tower_record("k1", "u1", "admin")).encode():
            await response.write(bytes([byte]))
            await asyncio.sleep(0.05)  # every read is quick; the answer is not
        return response

    tower.handler = drip
    started = time.monotonic()
    response = await h.client.get("/x", headers=KEY)
    assert response.status == 503
    assert time.monotonic() - started < 0.6 + 0.5
    assert h.upstream.seen == []


async def test_the_tower_secret_goes_to_the_tower_only(towered: tuple[Harness, Scripted]) -> None:
    h, tower = towered
    assert (await h.client.get("/x", headers=KEY)).status == 200
    ((_, path, headers, _),) = tower.requests
    assert path == "/api/v1/validate" and headers["X-Tower-Secret"] == TOWER_SECRET
    assert TOWER_SECRET not in json.dumps(h.upstream.seen[-1].headers)


# --------------------------------------------------------------------------- answers

# A valid answer's JSON without its closing brace, for values `json.dumps` cannot write.
RAW_VALID = '{"valid": true, "key_id": "k1", "user_id": "u1", "role": "admin"'
MALFORMED = {
    "missing_key_id": {"valid": True, "user_id": "u1", "role": "admin"},
    "missing_user_id": {"valid": True, "key_id": "k1", "role": "admin"},
    "missing_role": {"valid": True, "key_id": "k1", "user_id": "u1"},
    "empty_role": {"valid": True, "key_id": "k1", "user_id": "u1", "role": ""},
    "role_list": {"valid": True, "key_id": "k1", "user_id": "u1", "role": ["admin"]},
    "role_number": {"valid": True, "key_id": "k1", "user_id": "u1", "role": 1},
    "role_object": {"valid": True, "key_id": "k1", "user_id": "u1", "role": {"name": "admin"}},
    "user_id_number": {"valid": True, "key_id": "k1", "user_id": 7, "role": "admin"},
    "key_id_null": {"valid": True, "key_id": None, "user_id": "u1", "role": "admin"},
    "valid_string": {"valid": "true", "key_id": "k1", "user_id": "u1", "role": "admin"},
    "valid_one": {"valid": 1, "key_id": "k1", "user_id": "u1", "role": "admin"},
    "valid_missing": {"key_id": "k1", "user_id": "u1", "role": "admin"},
    "scopes_string": {**tower_record("k1", "u1", "operator"), "scopes": "admin:full"},
    "scopes_object": {**tower_record("k1", "u1", "operator"), "scopes": {"admin:full": True}},
    "scopes_nested": {**tower_record("k1", "u1", "operator"), "scopes": [["admin:full"]]},
    "scopes_with_null": {**tower_record("k1", "u1", "operator"), "scopes": ["a", None]},
    "scopes_too_many": {
        **tower_record("k1", "u1", "operator"),
        "scopes": [f"s{i}" for i in range(300)],
    },
    "metadata_list": {**tower_record("k1", "u1", "operator"), "metadata": ["team"]},
    "team_number": {**tower_record("k1", "u1", "operator"), "metadata": {"team": 5}},
    "expires_at_string": {**tower_record("k1", "u1", "admin"), "expires_at": "9999999999"},
    "expires_at_iso": {**tower_record("k1", "u1", "admin"), "expires_at": "2099-01-01T00:00:00Z"},
    "expires_at_millis": {
        **tower_record("k1", "u1", "admin"),
        "expires_at": int(time.time() * 1000) + 3_600_000,
    },
    "expires_at_true": {**tower_record("k1", "u1", "admin"), "expires_at": True},
    "expires_at_negative": {**tower_record("k1", "u1", "admin"), "expires_at": -1},
    "expires_at_nan": RAW_VALID + ', "expires_at": NaN}',
    "expires_at_infinity": RAW_VALID + ', "expires_at": Infinity}',
    "expires_at_huge": RAW_VALID + ', "expires_at": 1e400}',
    "long_user_id": tower_record("k1", "u" * 300, "admin"),
    "not_an_object": [tower_record("k1", "u1", "admin")],
    "not_json": "valid: true",
    "deeply_nested": "[" * 100_000,
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_a_malformed_valid_answer_is_a_fault_never_a_key(
    towered: tuple[Harness, Scripted], name: str
) -> None:
    h, tower = towered
    tower.handler = answer(MALFORMED[name])
    response = await h.client.get("/x", headers=KEY)
    assert response.status == 503, name
    assert (await response.json())["error"] == "tower_unavailable"
    assert h.upstream.seen == []


async def test_an_expiry_in_the_past_is_an_expired_key(towered: tuple[Harness, Scripted]) -> None:
    h, tower = towered
    tower.handler = answer({**tower_record("k1", "u1", "admin"), "expires_at": time.time() - 5})
    response = await h.client.get("/x", headers=KEY)
    assert response.status == 401
    assert (await response.json())["error"] == "expired_key"


# --------------------------------------------------------------------------- no widening

ROLE_LOOKALIKES = [
    "ADMIN",
    "Admin",
    "admin ",
    " admin",
    "\u0430dmin",  # Cyrillic a
    "\uff41dmin",  # fullwidth a
    "admin*",
    "adm?n",
    "[a]dmin",
]
# Not printable (str.isprintable): refused as a whole answer.
INVISIBLE = ["\u200b", "\x00", "\t", "\u202e", "\u00a0", "\ufeff", "\u2028"]
SCOPE_TRICKS = [
    "*",
    "*:*",
    "?*",
    "admin:*",
    "admin:ful?",
    "admin:f*",
    "[a]dmin:full",
    "admin:[f]ull",
    "admin:full ",
    " admin:full",
    "ADMIN:FULL",
    "admin:full,tools:execute",
    "\uff41dmin:full",
    "execute:*",
    "tools:*",
]


def claims_seen(h: Harness) -> dict[str, Any]:
    """The claims of the JWT the upstream received last."""
    auth = h.upstream.seen[-1].header("authorization")
    assert auth is not None and auth.startswith("Bearer ")
    claims: dict[str, Any] = jwt.decode(
        auth.split()[1], JWT_SECRET, algorithms=["HS256"], audience="internal"
    )
    return claims


def grants_for(role: str, scopes: list[str]) -> Any:
    config = parse_config({"tower": {"url": "http://127.0.0.1:9"}}, env=ENV)
    identity = Identity(key_id="k", user_id="u", role=role, scopes=tuple(scopes))
    return CapabilityMapper(config).grants(identity)


@pytest.mark.parametrize("role", ROLE_LOOKALIKES)
async def test_a_role_that_only_looks_like_admin_gets_no_role(
    towered: tuple[Harness, Scripted], role: str
) -> None:
    h, tower = towered
    tower.handler = answer(tower_record("k1", "u1", role))
    assert (await h.client.get("/admin/x", headers=KEY)).status == 403
    assert (await h.client.get("/x", headers=KEY)).status == 200
    claims = claims_seen(h)
    assert claims["role"] is None and claims["caps"] == []
    assert grants_for(role, []).role is None


@pytest.mark.parametrize("char", INVISIBLE)
@pytest.mark.parametrize("field", ["role", "scope"])
async def test_invisible_or_control_characters_make_the_answer_a_fault(
    towered: tuple[Harness, Scripted], char: str, field: str
) -> None:
    h, tower = towered
    if field == "role":
        tower.handler = answer(tower_record("k1", "u1", "admin" + char))
    else:
        tower.handler = answer(tower_record("k1", "u1", "operator", ["admin:full" + char]))
    assert (await h.client.get("/admin/x", headers=KEY)).status == 503
    assert h.upstream.seen == []


@pytest.mark.parametrize("scope", SCOPE_TRICKS)
async def test_a_glob_looking_scope_never_widens_into_a_capability(
    towered: tuple[Harness, Scripted], scope: str
) -> None:
    h, tower = towered
    tower.handler = answer(tower_record("k1", "u1", "operator", [scope]))
    assert (await h.client.get("/admin/x", headers=KEY)).status == 403
    assert (await h.client.get("/tools/x", headers=KEY)).status == 403
    assert (await h.client.get("/x", headers=KEY)).status == 200
    claims = claims_seen(h)
    # The scope is reported as the tower sent it; as a capability it would read as a
    # glob to an upstream, so it is not one in the token.
    assert claims["scopes"] == [scope]
    assert claims["caps"] == ([] if any(c in scope for c in "*?[]") else [scope])
    grants = grants_for("operator", [scope])
    for required in ("admin:write", "admin:full", "execute:read_file", "tools:execute", "x"):
        assert not grants.allows(required) or required == scope


async def test_the_real_scope_still_grants_what_the_config_says(
    towered: tuple[Harness, Scripted],
) -> None:
    h, tower = towered
    tower.handler = answer(tower_record("k1", "u1", "operator", ["tools:execute"]))
    assert (await h.client.get("/tools/x", headers=KEY)).status == 200
    assert (await h.client.get("/admin/x", headers=KEY)).status == 403
