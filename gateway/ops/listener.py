"""The ops listener: metrics, health, readiness, JWKS and the admin API.

`/admin/*` needs `Authorization: Bearer {admin.token}` (compared in constant
time); with no admin token configured it does not exist (404). The cache
endpoints are here; audit, config, explain and reload are in `gateway.ops.admin`, the
embedded tower's keys in `gateway.ops.keys_api` and their page in `gateway.ops.admin_ui`;
`GET /admin/openapi.json` describes them all (`gateway.ops.openapi`).
Every admin action, and every refused admin request, is an audit event.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.http.answers import json_error as _error
from gateway.http.answers import json_response as _json
from gateway.ops.admin import add_admin_routes, admin_client, audited_webhook
from gateway.ops.admin_ui import add_ui_routes
from gateway.ops.keys_api import KeyApiParts, add_key_routes, no_store
from gateway.ops.openapi import OPENAPI_PATH, admin_openapi
from gateway.ops.parts import OpsParts

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_guard(
    token: str | None, *, on_denied: Callable[[web.Request], None] | None = None
) -> Callable[[Handler], Handler]:
    """Wrap `/admin/*` handlers: 404 with no token configured, 401 without the bearer
    (reported to `on_denied`, never with what was sent)."""

    def admin(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if token is None:
                return _error(404, "not_found", "admin API disabled: no admin token configured")
            scheme, _, provided = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
            # compare_digest: the time taken must not reveal how much of the token matched.
            # surrogateescape: a header that is not UTF-8 is a wrong token, not a crash.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                provided.strip().encode("utf-8", "surrogateescape"), token.encode()
            ):
                if on_denied is not None:
                    on_denied(request)
                return _error(401, "unauthorized", "admin endpoints need the admin bearer token")
            return await handler(request)

        return guarded

    return admin


def create_ops_app(parts: OpsParts) -> web.Application:
    app = web.Application(middlewares=[no_store])
    readiness = parts.readiness
    token = parts.admin.token

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(parts.registry)
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ready, checks = await readiness.report()
        return _json({"ready": ready, "checks": checks}, 200 if ready else 503)

    async def jwks(_request: web.Request) -> web.Response:
        return _json(parts.jwks())

    def denied(request: web.Request) -> None:
        parts.audit().admin(
            "admin_denied",
            client=admin_client(request),
            ok=False,
            method=request.method,
            path=request.path,
        )

    admin = admin_guard(token, on_denied=denied)

    async def cache_stats(_request: web.Request) -> web.Response:
        return _json(parts.resolver.snapshot())

    async def cache_clear(request: web.Request) -> web.Response:
        await parts.revoker.revoke_all()
        parts.audit().admin("cache_clear", client=admin_client(request))
        return _json({"cleared": True})

    async def cache_drop(request: web.Request) -> web.Response:
        key_id = request.match_info["key_id"]
        dropped = await parts.revoker.revoke_key_ids([key_id])
        parts.audit().admin(
            "cache_drop", client=admin_client(request), key_id=key_id, dropped=dropped
        )
        return _json({"key_id": key_id, "dropped_entries": dropped})

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/admin/cache", admin(cache_stats))
    app.router.add_delete("/admin/cache", admin(cache_clear))
    app.router.add_delete("/admin/cache/{key_id}", admin(cache_drop))
    app.router.add_post("/admin/revocations", admin(audited_webhook(parts)))
    add_admin_routes(app, parts, admin)
    key_parts = KeyApiParts(
        store=parts.key_store,
        audit=parts.audit,
        revoke=parts.revoker.revoke_key_ids,
        roles=lambda: parts.config().roles,
    )
    add_key_routes(app, key_parts, admin)
    add_ui_routes(app, enabled=token is not None and parts.key_store is not None)
    document = admin_openapi()

    async def openapi(_request: web.Request) -> web.Response:
        return _json(document)

    app.router.add_get(OPENAPI_PATH, admin(openapi))
    return app
