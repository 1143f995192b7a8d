"""Roles and scopes -> capabilities: config globs match, raw tower scopes are literals."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.auth.capabilities import CapabilityMapper
from gateway.config import parse_config
from gateway.tower import Identity
from tests.conftest import ENV, GatewayFactory, Harness


def mapper(**sections: Any) -> CapabilityMapper:
    return CapabilityMapper(parse_config(sections, env=ENV))


def ident(role: str, *scopes: str) -> Identity:
    return Identity(key_id="k", user_id="u", role=role, scopes=tuple(sorted(scopes)))


def test_admin_role_star_satisfies_everything() -> None:
    grants = mapper().grants(ident("admin"))
    assert grants.role == "admin"
    for cap in ("admin:write", "execute:read_file", "*", "anything at all"):
        assert grants.allows(cap)
    assert grants.missing(("a", "b:c")) is None


def test_scope_glob_capability() -> None:
    grants = mapper().grants(ident("operator", "tools:execute"))
    assert grants.role == "operator"
    assert grants.allows("execute:read_file")
    assert grants.allows("execute:*")
    assert not grants.allows("execute")
    assert not grants.allows("admin:write")
    assert grants.missing(("execute:a", "admin:write", "execute:b")) == "admin:write"
    assert grants.caps == ("execute:*", "tools:execute")


def test_scope_keys_are_globs_matched_against_tower_scopes() -> None:
    m = mapper(capabilities={"scopes": {"tools:*": ["execute:*"], "read:?": ["read:any"]}})
    assert m.grants(ident("operator", "tools:deploy")).allows("execute:x")
    assert m.grants(ident("operator", "read:a")).allows("read:any")
    assert not m.grants(ident("operator", "read:ab")).allows("read:any")
    assert not m.grants(ident("operator", "toolsx")).allows("execute:x")


@pytest.mark.parametrize(
    "raw", ["*", "execute:*", "execute:?ead_file", "execute:[r]ead_file", "*:*"]
)
def test_raw_tower_scopes_are_literals(raw: str) -> None:
    grants = mapper().grants(ident("operator", raw))
    assert not grants.allows("execute:read_file")
    assert not grants.allows("admin:write")
    assert grants.allows(raw)  # only the identical requirement
    assert raw in grants.caps


def test_keep_scopes_false_drops_raw_scopes() -> None:
    grants = mapper(capabilities={"keep_scopes": False}).grants(ident("operator", "reports:read"))
    assert not grants.allows("reports:read")
    assert grants.caps == ()


def test_tower_role_mapping_and_unknown_roles() -> None:
    m = mapper(roles={"superuser": "admin", "operator": "operator"})
    grants = m.grants(ident("superuser"))
    assert grants.role == "admin" and grants.allows("admin:write")
    # `admin` is not in this mapping any more: no role, no role capabilities.
    unknown = m.grants(ident("admin"))
    assert unknown.role is None
    assert not unknown.allows("admin:write") and unknown.caps == ()
    assert m.grants(ident("root", "tools:execute")).allows("execute:x")  # scopes still count


def test_role_without_capabilities() -> None:
    grants = mapper().grants(ident("observer"))
    assert grants.role == "observer" and grants.caps == ()
    assert grants.missing(()) is None
    assert grants.missing(("read",)) == "read"


# --------------------------------------------------------------------------- through the gateway


async def test_missing_capability_is_403_with_the_capability(gw: Harness) -> None:
    response = await gw.client.get("/admin/users", headers={"X-API-Key": "good-key-1"})
    assert response.status == 403
    assert await response.json() == {
        "error": "missing_capability",
        "detail": "Missing required capability: admin:write",
    }
    assert response.headers.get("X-Request-Id")
    assert gw.upstream.seen == []
    response = await gw.client.get("/tools/run", headers={"X-API-Key": "good-key-1"})
    assert response.status == 200
    response = await gw.client.get("/admin/users", headers={"X-API-Key": "admin-key-1"})
    assert response.status == 200


async def test_tower_scope_star_does_not_widen_itself(gw: Harness) -> None:
    gw.tower.add(
        "wild-key", key_id="k9", user_id="u9", role="observer", scopes=["*", "execute:*", "admin:*"]
    )
    for path, cap in (("/tools/x", "execute:read_file"), ("/admin/x", "admin:write")):
        response = await gw.client.get(path, headers={"X-API-Key": "wild-key"})
        assert response.status == 403, path
        assert (await response.json())["detail"] == f"Missing required capability: {cap}"
    assert gw.upstream.seen == []


async def test_unknown_tower_role_gets_no_role_capabilities(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(capabilities={"roles": {"admin": ["*"], "ghost": ["*"]}})
    h.tower.add("ghost-key", key_id="k3", user_id="u3", role="ghost")
    response = await h.client.get("/admin/x", headers={"X-API-Key": "ghost-key"})
    # `ghost` has capabilities, but no tower role maps to it.
    assert response.status == 403
    response = await h.client.get("/x", headers={"X-API-Key": "ghost-key"})
    assert response.status == 200  # no requirement on `/`


async def test_all_requirements_are_needed(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(
        routes=[
            {
                "path": "/",
                "upstream": "http://127.0.0.1:9",
                "require": ["execute:run", "reports:read"],
            }
        ]
    )
    h.tower.add("k", key_id="k1", user_id="u1", role="operator", scopes=["tools:execute"])
    response = await h.client.get("/x", headers={"X-API-Key": "k"})
    assert response.status == 403
    assert (await response.json())["detail"] == "Missing required capability: reports:read"
