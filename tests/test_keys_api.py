"""The embedded tower's key API on the ops listener (CONTRACT section 13), end to end.

Each test runs a real `Gateway` whose tower is the embedded SQLite store, with
its proxy and ops listeners on loopback and the fake upstream behind it; keys
made through the API are used against the proxy listener.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis.asyncio
from aiohttp import hdrs

from gateway.ops.admin_ui import CSP
from gateway.ops.keys_api import MAX_BODY, local_store
from gateway.tower import keys_ops
from gateway.tower.store import KeyStore
from tests.conftest import ADMIN_TOKEN, JWT_SECRET, GatewayFactory, Harness, until
from tests.redis_support import RedisServer

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def local_gateway(make_gateway: GatewayFactory, db: Path, **overrides: Any) -> Harness:
    return await make_gateway(tower={"local": {"db": str(db)}}, **overrides)


@pytest.fixture
async def gw(make_gateway: GatewayFactory, tmp_path: Path) -> Harness:
    return await local_gateway(make_gateway, tmp_path / "keys.db")


def store_of(harness: Harness) -> KeyStore:
    store = local_store(harness.gateway.tower)
    assert store is not None
    return store


async def call(
    harness: Harness, method: str, path: str, body: Any = None, **kw: Any
) -> tuple[int, Any]:
    if body is not None:
        kw["json"] = body
    response = await harness.ops.request(method, path, headers=ADMIN, **kw)
    assert response.headers[hdrs.CACHE_CONTROL] == "no-store"
    return response.status, await response.json()


async def create(harness: Harness, **fields: Any) -> tuple[str, dict[str, Any]]:
    status, body = await call(harness, "POST", "/admin/keys", {"user_id": "alice", **fields})
    assert status == 201, body
    return body["key"], body["record"]


async def proxied(harness: Harness, key: str, path: str = "/data") -> int:
    response = await harness.client.get(path, headers={"X-API-Key": key})
    return response.status


# --------------------------------------------------------------------------- the operations


async def test_a_created_key_is_shown_once_listed_without_it_and_works_on_the_proxy(
    gw: Harness,
) -> None:
    key, record = await create(
        gw, role="operator", scopes=["tools:execute"], expires_in_days=30, team="blue"
    )
    assert record["status"] == "active" and record["user_id"] == "alice"
    assert record["scopes"] == ["tools:execute"] and record["team"] == "blue"
    assert key.startswith(record["prefix"]) and record["expires_at"] > time.time() + 29 * 86400

    assert await proxied(gw, key) == 200
    claims = jwt.decode(
        gw.upstream.seen[-1].header("Authorization").removeprefix("Bearer "),  # type: ignore[union-attr]
        JWT_SECRET,
        algorithms=["HS256"],
        audience="internal",
    )
    assert claims["sub"] == "alice" and claims["key_id"] == record["key_id"]
    assert claims["team"] == "blue"

    status, listing = await call(gw, "GET", "/admin/keys")
    assert status == 200 and listing["total"] == 1
    [listed] = listing["keys"]
    assert listed["key_id"] == record["key_id"] and listed["requests"] == 1
    assert listed["last_used_at"] is not None
    assert set(listed) >= {
        "key_id", "prefix", "user_id", "role", "scopes", "env", "status", "created_at",
        "expires_at", "last_used_at", "requests",
    }  # fmt: skip

    status, shown = await call(gw, "GET", f"/admin/keys/{record['key_id']}")
    assert status == 200 and shown["record"]["key_id"] == record["key_id"]
    assert shown["usage"] == {
        "requests": 1,
        "last_used_at": listed["last_used_at"],
        "statuses": None,
    }
    # The secret part of the key is in no answer but the creation's.
    for answer in (listing, shown):
        assert key[len(record["prefix"]) :] not in json.dumps(answer)


async def test_revoking_refuses_the_key_at_once_where_the_cli_waits_for_the_cache(
    gw: Harness,
) -> None:
    by_store, by_store_record = await create(gw, role="operator")
    by_api, by_api_record = await create(gw, role="operator")
    assert await proxied(gw, by_store) == 200 and await proxied(gw, by_api) == 200

    # What `keys revoke` does: the store alone. The cached identity keeps serving.
    keys_ops.revoke_key(store_of(gw), by_store_record["key_id"])
    assert await proxied(gw, by_store) == 200

    status, body = await call(
        gw, "POST", f"/admin/keys/{by_api_record['key_id']}/revoke", {"reason": "leaked"}
    )
    assert status == 200, body
    assert body["record"]["status"] == "revoked" and body["record"]["revoke_reason"] == "leaked"
    assert body["dropped_entries"] == 1
    assert await proxied(gw, by_api) == 401

    # Revoking again keeps the first revocation; the key stays refused.
    status, again = await call(gw, "POST", f"/admin/keys/{by_api_record['key_id']}/revoke", {})
    assert status == 200 and again["record"]["revoke_reason"] == "leaked"


async def test_rotation_issues_a_new_key_and_the_old_one_obeys_its_grace_at_once(
    gw: Harness,
) -> None:
    old_key, old = await create(gw, role="operator", scopes=["tools:execute"])
    assert await proxied(gw, old_key) == 200

    status, body = await call(gw, "POST", f"/admin/keys/{old['key_id']}/rotate", {"grace_hours": 2})
    assert status == 201, body
    new_key, new, previous = body["key"], body["record"], body["previous"]
    assert new_key != old_key and new["scopes"] == ["tools:execute"]
    assert previous["status"] == "rotating" and previous["rotated_to"] == new["key_id"]
    assert previous["expires_at"] == pytest.approx(time.time() + 7200, abs=60)
    assert await proxied(gw, new_key) == 200
    assert await proxied(gw, old_key) == 200  # inside its grace
    # The cached identity was dropped: the one cached now carries the grace end.
    cached = gw.gateway.resolver.peek(gw.gateway.fingerprinter.digest(old_key))
    assert cached is not None and cached.expires_at == previous["expires_at"]

    # Without grace the old key is refused from the next request, though it was cached.
    status, body = await call(gw, "POST", f"/admin/keys/{new['key_id']}/rotate", {"grace_hours": 0})
    assert status == 201
    assert await proxied(gw, new_key) == 401
    assert await proxied(gw, body["key"]) == 200

    status, refused = await call(gw, "POST", f"/admin/keys/{old['key_id']}/rotate", {})
    assert status == 409 and refused["error"] == "conflict"
    assert "already rotated" in refused["detail"]
    status, refused = await call(gw, "PATCH", f"/admin/keys/{old['key_id']}", {"role": "admin"})
    assert status == 409 and "cannot be changed" in refused["detail"]


async def test_an_update_applies_at_once_and_an_expired_key_can_be_extended(
    gw: Harness,
) -> None:
    key, record = await create(gw, role="operator")
    key_id = record["key_id"]
    assert await proxied(gw, key, "/admin/x") == 403  # needs admin:write

    status, body = await call(gw, "PATCH", f"/admin/keys/{key_id}", {"role": "admin"})
    assert status == 200 and body["record"]["role"] == "admin"
    assert await proxied(gw, key, "/admin/x") == 200

    status, body = await call(
        gw, "PATCH", f"/admin/keys/{key_id}",
        {"scopes": ["a", "b"], "rate_limit": 7, "team": "red", "expires_in_days": 2},
    )  # fmt: skip
    assert status == 200, body
    changed = body["record"]
    assert changed["scopes"] == ["a", "b"] and changed["rate_limit"] == 7
    assert changed["team"] == "red"
    assert changed["expires_at"] == pytest.approx(time.time() + 2 * 86400, abs=60)
    response = await gw.client.get("/data", headers={"X-API-Key": key})
    assert response.headers["RateLimit-Limit"] == "7"

    status, body = await call(gw, "PATCH", f"/admin/keys/{key_id}", {"team": None})
    assert status == 200 and body["record"]["team"] is None

    await call(gw, "POST", f"/admin/keys/{key_id}/revoke", {})
    status, refused = await call(gw, "PATCH", f"/admin/keys/{key_id}", {"role": "operator"})
    assert status == 409 and "revoked" in refused["detail"]


async def test_an_expired_key_can_be_extended(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    # A refusal is cached for `cache.negative_ttl` without its key_id, so an extended key is
    # accepted again once that entry lapses (1 s here).
    gw = await local_gateway(make_gateway, tmp_path / "keys.db", cache={"negative_ttl": 1})
    key, record = await create(gw, role="operator", expires_in_days=1)
    key_id = record["key_id"]
    expired_at = time.time() + 0.3
    store_of(gw).update(key_id, {"expires_at": expired_at})  # as time would, soon
    await until(lambda: time.time() > expired_at, what="the key's expiry")
    assert await proxied(gw, key) == 401
    status, listing = await call(gw, "GET", "/admin/keys?status=expired")
    assert [k["key_id"] for k in listing["keys"]] == [key_id]

    status, body = await call(gw, "PATCH", f"/admin/keys/{key_id}", {"expires_at": None})
    assert status == 200 and body["record"]["status"] == "active"
    assert body["record"]["expires_at"] is None

    async def accepted() -> bool:
        return await proxied(gw, key) == 200

    await until(accepted, within=5, interval=0.1, what="the extended key accepted")


async def test_filters_and_pages(gw: Harness) -> None:
    ids = []
    for user, role in [("ann", "admin"), ("bob", "operator"), ("ann", "operator")]:
        ids.append((await create(gw, user_id=user, role=role))[1]["key_id"])
    await call(gw, "POST", f"/admin/keys/{ids[1]}/revoke", {})

    async def listed(query: str) -> list[str]:
        status, body = await call(gw, "GET", f"/admin/keys?{query}")
        assert status == 200, body
        return [k["key_id"] for k in body["keys"]]

    assert await listed("user_id=ann") == [ids[0], ids[2]]
    assert await listed("role=operator") == [ids[1], ids[2]]
    assert await listed("status=revoked") == [ids[1]]
    assert await listed("status=active&role=operator") == [ids[2]]
    assert await listed("user_id=nobody") == []
    status, page = await call(gw, "GET", "/admin/keys?limit=2&offset=1")
    assert status == 200 and page["total"] == 3
    assert [k["key_id"] for k in page["keys"]] == ids[1:]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"role": "admin"}, "user_id"),
        ({"user_id": "u"}, "role"),
        ({"user_id": "u", "role": ""}, "role"),
        ({"user_id": "u", "role": "ad\nmin"}, "role"),
        ({"user_id": 5, "role": "admin"}, "user_id"),
        ({"user_id": "u", "role": "admin", "scopes": "admin:full"}, "scopes"),
        ({"user_id": "u", "role": "admin", "scopes": ["ok", ""]}, "scopes"),
        ({"user_id": "u", "role": "admin", "scopes": [1]}, "scopes"),
        ({"user_id": "u", "role": "admin", "expires_in_days": 0}, "expires_in_days"),
        ({"user_id": "u", "role": "admin", "expires_in_days": "7"}, "expires_in_days"),
        ({"user_id": "u", "role": "admin", "env": "prod"}, "env"),
        ({"user_id": "u", "role": "admin", "rate_limit": -1}, "rate_limit"),
        ({"user_id": "u", "role": "admin", "rate_limit": True}, "rate_limit"),
        ({"user_id": "u", "role": "admin", "team": 3}, "team"),
        ({"user_id": "u", "role": "admin", "colour": "red"}, "colour"),
        ({"user_id": "u", "role": "admin", "allowed_ips": ["10.0.0.0/8"]}, "allowed_ips"),
        ([], "body"),
        ("text", "body"),
    ],
)
async def test_bad_fields_are_400_naming_the_field(gw: Harness, body: Any, field: str) -> None:
    status, answer = await call(gw, "POST", "/admin/keys", body)
    assert status == 400, answer
    assert answer["error"] == "bad_request" and answer["field"] == field
    assert answer["detail"]
    assert store_of(gw).list() == []


async def test_bad_bodies_and_queries_are_refused(gw: Harness) -> None:
    _, record = await create(gw, role="admin")
    key_id = record["key_id"]
    cases: list[tuple[str, str, dict[str, Any], int, str | None]] = [
        ("POST", "/admin/keys", {"data": b"user_id=u&role=admin",
         "headers": {**ADMIN, "Content-Type": "application/x-www-form-urlencoded"}}, 415, "body"),
        ("POST", "/admin/keys", {"data": b"{not json",
         "headers": {**ADMIN, "Content-Type": "application/json"}}, 400, "body"),
        ("POST", "/admin/keys", {"data": b'{"user_id": "a", "user_id": "b", "role": "x"}',
         "headers": {**ADMIN, "Content-Type": "application/json"}}, 400, "body"),
        ("POST", "/admin/keys", {"json": {"user_id": "u" * MAX_BODY, "role": "admin"}}, 413,
         "body"),
        ("POST", f"/admin/keys/{key_id}/revoke", {}, 415, "body"),
        ("POST", f"/admin/keys/{key_id}/revoke", {"json": {"reason": 5}}, 400, "reason"),
        ("POST", f"/admin/keys/{key_id}/rotate", {"json": {"grace_hours": -1}}, 400, "grace_hours"),
        ("POST", f"/admin/keys/{key_id}/rotate", {"json": {"grace": 1}}, 400, "grace"),
        ("PATCH", f"/admin/keys/{key_id}", {"json": {}}, 400, "body"),
        ("PATCH", f"/admin/keys/{key_id}", {"json": {"expires_at": 1}}, 400, "expires_at"),
        ("PATCH", f"/admin/keys/{key_id}", {"json": {"expires_in_days": -1}}, 400,
         "expires_in_days"),
        ("PATCH", f"/admin/keys/{key_id}", {"json": {"expires_in_days": 1, "expires_at": None}},
         400, "expires_in_days"),
        ("PATCH", f"/admin/keys/{key_id}", {"json": {"role": None}}, 400, "role"),
        ("PATCH", f"/admin/keys/{key_id}", {"json": {"user_id": "eve"}}, 400, "user_id"),
        ("PATCH", f"/admin/keys/{key_id}", {"json": {"quota": {"limit": 5}}}, 400, "quota"),
        ("GET", "/admin/keys?status=sleeping", {}, 400, "status"),
        ("GET", "/admin/keys?limit=0", {}, 400, "limit"),
        ("GET", "/admin/keys?offset=-1", {}, 400, "offset"),
        ("GET", "/admin/keys?owner=x", {}, 400, "owner"),
    ]  # fmt: skip
    for method, path, kw, status, field in cases:
        kw.setdefault("headers", ADMIN)
        response = await gw.ops.request(method, path, **kw)
        answer = await response.json()
        assert (response.status, answer.get("field")) == (status, field), (method, path, answer)
        assert response.headers[hdrs.CACHE_CONTROL] == "no-store"
    assert [r.key_id for r in store_of(gw).list()] == [key_id]
    assert store_of(gw).get(key_id).status == "active"


async def test_a_body_sent_in_chunks_is_read_whole_and_bounded(gw: Harness) -> None:
    async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
        for start in range(0, len(data), size):
            yield data[start : start + size]
            await asyncio.sleep(0.01)

    headers = {**ADMIN, "Content-Type": "application/json"}
    body = json.dumps({"user_id": "chunky", "role": "admin", "scopes": ["s"] * 50}).encode()
    response = await gw.ops.post("/admin/keys", data=pieces(body, 16), headers=headers)
    assert response.status == 201, await response.text()
    huge = json.dumps({"user_id": "u", "role": "admin", "team": "t" * MAX_BODY}).encode()
    response = await gw.ops.post("/admin/keys", data=pieces(huge, 4096), headers=headers)
    assert response.status == 413
    assert [r.user_id for r in store_of(gw).list()] == ["chunky"]


async def test_unknown_key_ids_are_404_without_echoing_them(gw: Harness) -> None:
    for method, path, body in [
        ("GET", "/admin/keys/key_0000000000000000", None),
        ("PATCH", "/admin/keys/key_0000000000000000", {"role": "admin"}),
        ("POST", "/admin/keys/key_0000000000000000/revoke", {}),
        ("POST", "/admin/keys/%3Cscript%3E/rotate", {}),
    ]:
        status, answer = await call(gw, method, path, body)
        assert (status, answer["error"]) == (404, "unknown_key"), path
        assert "0000" not in answer["detail"] and "script" not in answer["detail"]


async def test_every_route_needs_the_admin_token(gw: Harness) -> None:
    routes = [
        ("GET", "/admin/keys"),
        ("POST", "/admin/keys"),
        ("GET", "/admin/keys/k"),
        ("PATCH", "/admin/keys/k"),
        ("POST", "/admin/keys/k/revoke"),
        ("POST", "/admin/keys/k/rotate"),
    ]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
            response = await gw.ops.request(
                method, path, json={"user_id": "u", "role": "admin"}, headers=headers
            )
            assert response.status == 401, (method, path)
    assert store_of(gw).list() == []


async def test_without_a_local_tower_or_an_admin_token_the_routes_are_404(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    remote = await make_gateway()
    no_token = await local_gateway(make_gateway, tmp_path / "k.db", admin={"token": ""})
    for harness in (remote, no_token):
        for method, path in [
            ("GET", "/admin/keys"),
            ("POST", "/admin/keys"),
            ("POST", "/admin/keys/k/revoke"),
            ("GET", "/admin/ui"),
            ("GET", "/admin/ui/app.js"),
        ]:
            response = await harness.ops.request(
                method, path, json={"user_id": "u", "role": "admin"}, headers=ADMIN
            )
            assert response.status == 404, (method, path)
    assert store_of(no_token).list() == []


# --------------------------------------------------------------------------- audit and secrets


async def test_every_call_is_audited_and_no_secret_is_logged(
    gw: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key, record = await create(gw, role="admin")
    key_id = record["key_id"]
    await call(gw, "GET", "/admin/keys")
    await call(gw, "GET", f"/admin/keys/{key_id}")
    await call(gw, "PATCH", f"/admin/keys/{key_id}", {"team": "x"})
    status, rotated = await call(gw, "POST", f"/admin/keys/{key_id}/rotate", {})
    assert status == 201
    new_id = rotated["record"]["key_id"]
    await call(gw, "POST", f"/admin/keys/{new_id}/revoke", {})
    await call(gw, "POST", "/admin/keys", {"user_id": "u"})
    await gw.ops.get("/admin/keys")

    events = [e for e in gw.gateway.audit.recent(100) if e["event"] == "admin"]
    actions = [(e["action"], e["outcome"], e.get("key_id")) for e in reversed(events)]
    assert actions == [
        ("key_create", "success", key_id),
        ("keys_list", "success", None),
        ("key_show", "success", key_id),
        ("key_update", "success", key_id),
        ("key_rotate", "success", key_id),
        ("key_revoke", "success", new_id),
        ("key_create", "failure", None),
        ("admin_denied", "failure", None),
    ]
    assert events[1]["field"] == "role" and events[1]["status"] == 400
    metrics = await gw.metrics()
    everything = json.dumps(events) + caplog.text + metrics
    for secret in (key, rotated["key"], ADMIN_TOKEN):
        assert secret not in everything


async def test_a_replica_refuses_a_key_revoked_on_another_at_once(
    make_gateway: GatewayFactory,
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    tmp_path: Path,
) -> None:
    db = tmp_path / "shared.db"
    a = await local_gateway(make_gateway, db, redis={"url": redis_server.url})
    b = await local_gateway(make_gateway, db, redis={"url": redis_server.url})

    def subscribed() -> bool:
        replicas = [h.gateway.replicas for h in (a, b)]
        return all(r is not None and r.bus.connected for r in replicas)

    await until(subscribed, what="both replicas subscribed")
    key, record = await create(a, role="operator")
    assert await proxied(a, key) == 200 and await proxied(b, key) == 200
    digest = b.gateway.fingerprinter.digest(key)
    assert b.gateway.resolver.peek(digest) is not None

    status, _ = await call(a, "POST", f"/admin/keys/{record['key_id']}/revoke", {})
    assert status == 200
    await until(lambda: b.gateway.resolver.peek(digest) is None, what="b dropping the key")
    assert await proxied(b, key) == 401


# --------------------------------------------------------------------------- the page


async def test_the_page_is_served_with_a_strict_policy_and_no_inline_code(gw: Harness) -> None:
    response = await gw.ops.get("/admin/ui")
    assert response.status == 200 and response.content_type == "text/html"
    assert response.headers["Content-Security-Policy"] == CSP
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP
    assert response.headers[hdrs.CACHE_CONTROL] == "no-store"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    page = await response.text()
    # Every script is a file of this origin; no handler attribute, no style attribute.
    assert page.count("<script") == page.count('<script src="ui/app.js" defer></script>') == 1
    assert re.search(r"<[^>]*\son[a-z]+\s*=", page) is None and "style=" not in page
    assert "http://" not in page and "https://" not in page
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert links and all(link.startswith(("ui/", "#")) for link in links)
    for asset, kind in [("app.js", "text/javascript"), ("app.css", "text/css")]:
        response = await gw.ops.get(f"/admin/ui/{asset}")
        assert response.status == 200 and response.content_type == kind
        assert response.headers["Content-Security-Policy"] == CSP
        text = await response.text()
        assert "http://" not in text and "https://" not in text and "@import" not in text
    script = await (await gw.ops.get("/admin/ui/app.js")).text()
    unsafe = r"\.(inner|outer)HTML|insertAdjacentHTML|document\.write|eval\("
    assert re.search(unsafe, script) is None
    assert "localStorage" not in script and "document.cookie" not in script
    assert (await gw.ops.get("/admin/ui/../keys.db")).status == 404
    assert (await gw.ops.get("/admin/ui/keys.db")).status == 404
