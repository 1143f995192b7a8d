"""The embedded tower's key-management API on the ops listener (CONTRACT section 13).

    GET   /admin/keys?user_id=&role=&status=&limit=&offset=   keys, never a secret
    POST  /admin/keys                        create; 201 with the key, shown this once
    GET   /admin/keys/{key_id}               one key and its request counts
    PATCH /admin/keys/{key_id}               role, scopes, expiry, rate_limit, team
    POST  /admin/keys/{key_id}/revoke        {"reason"?}; refused at once, here and everywhere
    POST  /admin/keys/{key_id}/rotate        {"grace_hours"?}; 201 with the new key

Behind the admin guard (`gateway.ops.listener.admin_guard`), 404 without `tower.local`.
Every call is an audit event (never with a raw key). Revoke, rotate and update
drop the key's cached identities through the same path as
`DELETE /admin/cache/{key_id}`, which with Redis reaches every replica; under
`--workers N` the supervisor sends that drop to every worker (`gateway.runtime.group_ops`).
State changes take a JSON body (`Content-Type: application/json`, at most
`MAX_BODY` bytes), so no HTML form can make one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import hdrs, web

from gateway.ops.admin import admin_client
from gateway.ops.audit import AuditLog
from gateway.tower import keys_ops
from gateway.tower.local import LocalTower
from gateway.tower.records import FieldError, KeyNotFound, KeyStateError, StoreError
from gateway.tower.store import KeyStore

log = logging.getLogger("tower_gateway.keys")

MAX_BODY: Final = 16 * 1024
JSON_TYPE: Final = "application/json"
NO_STORE: Final = "no-store"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A refusal; `respond` turns it into the JSON error body in one place."""

    def __init__(self, status: int, code: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data),
        status=status,
        content_type=JSON_TYPE,
        headers={hdrs.CACHE_CONTROL: NO_STORE},
    )


@web.middleware
async def no_store(request: web.Request, handler: Handler) -> web.StreamResponse:
    """`Cache-Control: no-store` on every `/admin` answer: none may sit in a shared cache or
    the browser's history (they carry keys once, and always who holds which)."""
    response = await handler(request)
    if request.path.startswith("/admin") and not response.prepared:
        response.headers[hdrs.CACHE_CONTROL] = NO_STORE
    return response


def local_store(tower: object) -> KeyStore | None:
    """The embedded tower's store, when the gateway's tower is one (`tower.local`)."""
    return tower.store if isinstance(tower, LocalTower) else None


@dataclass(frozen=True, slots=True)
class KeyApiParts:
    """What the key API reaches, handed in by the ops listener."""

    store: KeyStore | None  # None without the embedded tower: every route answers 404
    audit: Callable[[], AuditLog]  # the audit log in use
    revoke: Callable[[Sequence[str]], Awaitable[int]]  # drop cached identities, replicas too
    roles: Callable[[], Mapping[str, str]]  # the `roles` map in effect


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name, value in pairs:
        if name in data:
            raise ApiError(400, "bad_request", "a JSON member is repeated", "body")
        data[name] = value
    return data


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, bounded; a form or any other type is refused."""
    if request.content_type != JSON_TYPE:
        raise ApiError(415, "unsupported_media_type", f"the body must be {JSON_TYPE}", "body")
    too_large = ApiError(413, "body_too_large", f"at most {MAX_BODY} bytes", "body")
    if (request.content_length or 0) > MAX_BODY:
        raise too_large
    body = bytearray()
    # Chunk by chunk: one `read(n)` may return less than a body that arrives in pieces.
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > MAX_BODY:
            raise too_large
    try:
        return json.loads(body, object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError):
        # A fixed text: a decoder's message quotes the input.
        raise ApiError(400, "bad_request", "the body is not JSON", "body") from None


def add_key_routes(
    app: web.Application, parts: KeyApiParts, admin: Callable[[Handler], Handler]
) -> None:
    """Mount the key API on an ops app; the routes exist even without a local tower (then
    they answer 404), so the OpenAPI document is the same for every config."""
    store = parts.store

    def operation(
        action: str, run: Callable[[web.Request, KeyStore], Awaitable[web.Response]]
    ) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            client = admin_client(request)
            try:
                if store is None:
                    raise ApiError(
                        404, "not_found", "key management needs the embedded tower (tower.local)"
                    )
                return await run(request, store)
            except ApiError as exc:
                error = exc
            except FieldError as exc:
                error = ApiError(400, "bad_request", str(exc), exc.field)
            except KeyNotFound:
                # Fixed text: the id came from the client.
                error = ApiError(404, "unknown_key", "no key with this key_id")
            except KeyStateError as exc:
                error = ApiError(409, "conflict", str(exc))
            except StoreError as exc:
                error = ApiError(400, "bad_request", str(exc))
            except sqlite3.Error as exc:
                log.error("key store error during %s: %s", action, exc)
                error = ApiError(503, "store_unavailable", "the key store cannot answer now")
            key_id = request.match_info.get("key_id")
            parts.audit().admin(
                action,
                client=client,
                ok=False,
                status=error.status,
                key_id=key_id,
                reason=error.code,
                field=error.field,
            )
            body = {"error": error.code, "detail": error.detail}
            if error.field is not None:
                body["field"] = error.field
            return _json(body, error.status)

        return admin(handler)

    async def flushed(store: KeyStore) -> None:
        # Uses counted in this process since the last flush, so the counts shown are current.
        try:
            await asyncio.to_thread(store.flush_usage)
        except sqlite3.Error as exc:
            log.warning("key usage flush before a read failed: %s", exc)

    async def forget(key_id: str) -> int:
        dropped: int = await parts.revoke([key_id])
        return dropped

    async def list_keys(request: web.Request, store: KeyStore) -> web.Response:
        query = keys_ops.parse_query(request.query)
        await flushed(store)
        records, total = await asyncio.to_thread(keys_ops.list_keys, store, query)
        parts.audit().admin(
            "keys_list",
            client=admin_client(request),
            user_id=query.user_id,
            role=query.role,
            status=request.query.get("status"),
            count=len(records),
        )
        return _json(
            {
                "keys": [keys_ops.key_json(r) for r in records],
                "total": total,
                "offset": query.offset,
                "limit": query.limit,
            }
        )

    async def create(request: web.Request, store: KeyStore) -> web.Response:
        new = keys_ops.parse_create(await read_json(request))
        raw, record = await asyncio.to_thread(keys_ops.create_key, store, new)
        parts.audit().admin(
            "key_create",
            client=admin_client(request),
            key_id=record.key_id,
            user_id=record.user_id,
            role=record.role,
        )
        answer: dict[str, Any] = {"key": raw, "record": keys_ops.key_json(record)}
        if record.role not in parts.roles():
            answer["warning"] = (
                f"role {record.role!r} is not mapped in `roles`: the gateway will refuse this key"
            )
        return _json(answer, 201)

    async def show(request: web.Request, store: KeyStore) -> web.Response:
        key_id = request.match_info["key_id"]
        await flushed(store)
        record = await asyncio.to_thread(store.get, key_id)
        parts.audit().admin("key_show", client=admin_client(request), key_id=key_id)
        return _json({"record": keys_ops.key_json(record), "usage": keys_ops.usage_json(record)})

    async def update(request: web.Request, store: KeyStore) -> web.Response:
        key_id = request.match_info["key_id"]
        changes = keys_ops.parse_update(await read_json(request))
        record = await asyncio.to_thread(keys_ops.update_key, store, key_id, changes)
        dropped = await forget(key_id)
        parts.audit().admin(
            "key_update", client=admin_client(request), key_id=key_id, changed=sorted(changes)
        )
        return _json({"record": keys_ops.key_json(record), "dropped_entries": dropped})

    async def revoke(request: web.Request, store: KeyStore) -> web.Response:
        key_id = request.match_info["key_id"]
        reason = keys_ops.parse_revoke(await read_json(request))
        record = await asyncio.to_thread(keys_ops.revoke_key, store, key_id, reason)
        dropped = await forget(key_id)
        parts.audit().admin(
            "key_revoke", client=admin_client(request), key_id=key_id, dropped=dropped
        )
        return _json({"record": keys_ops.key_json(record), "dropped_entries": dropped})

    async def rotate(request: web.Request, store: KeyStore) -> web.Response:
        key_id = request.match_info["key_id"]
        grace_hours = keys_ops.parse_rotate(await read_json(request))
        raw, new, old = await asyncio.to_thread(keys_ops.rotate_key, store, key_id, grace_hours)
        # The old key's cached identity carries its old expiry: the next request reads the
        # grace end instead.
        dropped = await forget(key_id)
        parts.audit().admin(
            "key_rotate",
            client=admin_client(request),
            key_id=key_id,
            new_key_id=new.key_id,
            grace_hours=grace_hours,
        )
        return _json(
            {
                "key": raw,
                "record": keys_ops.key_json(new),
                "previous": keys_ops.key_json(old),
                "dropped_entries": dropped,
            },
            201,
        )

    app.router.add_get("/admin/keys", operation("keys_list", list_keys))
    app.router.add_post("/admin/keys", operation("key_create", create))
    app.router.add_get("/admin/keys/{key_id}", operation("key_show", show))
    app.router.add_patch("/admin/keys/{key_id}", operation("key_update", update))
    app.router.add_post("/admin/keys/{key_id}/revoke", operation("key_revoke", revoke))
    app.router.add_post("/admin/keys/{key_id}/rotate", operation("key_rotate", rotate))
