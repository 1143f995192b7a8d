"""The ops listener: metrics, health, readiness, JWKS and the admin API.

`/admin/*` needs `Authorization: Bearer {admin.token}` (compared in constant
time); with no admin token configured it does not exist (404). The cache
endpoints are here; audit, config, explain and reload are in `gateway.admin`, the
embedded tower's keys in `gateway.keys_api` and their page in `gateway.admin_ui`;
`GET /admin/openapi.json` describes them all (`gateway.openapi`).
Every admin action, and every refused admin request, is an audit event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.admin import add_admin_routes, admin_client, audited_webhook
from gateway.admin_ui import add_ui_routes
from gateway.keys_api import KeyApiParts, add_key_routes, local_store, no_store
from gateway.openapi import OPENAPI_PATH, admin_openapi

if TYPE_CHECKING:
    from gateway.app import Gateway

READY_CACHE_SECONDS: Final = 2.0
PING_TIMEOUT: Final = 2.0

OPS_GATEWAY: Final[web.AppKey[Gateway]] = web.AppKey("ops_gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


def _error(status: int, code: str, detail: str) -> web.Response:
    return _json({"error": code, "detail": detail}, status)


class Readiness:
    """Tower reachability, probed at most every couple of seconds."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._checked_at = 0.0
        self._tower_ok = False
        self._lock = asyncio.Lock()

    async def tower_ok(self) -> bool:
        async with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= READY_CACHE_SECONDS:
                try:
                    async with asyncio.timeout(PING_TIMEOUT):
                        self._tower_ok = await self._gateway.tower.ping()
                except TimeoutError:
                    self._tower_ok = False
                self._checked_at = now
            return self._tower_ok

    async def report(self) -> tuple[bool, dict[str, Any]]:
        gateway = self._gateway
        tower_ok = await self.tower_ok()
        positive, _ = gateway.resolver.entry_counts()
        checks: dict[str, Any] = {
            "config": True,
            "tower": tower_ok,
            "cache_can_serve": positive > 0,
        }
        ready = tower_ok or positive > 0
        redis_ping = getattr(gateway, "redis_ok", None)
        if redis_ping is not None:
            # Reported, not required: without Redis every replica still serves
            # (local cache, local rate limits), so an outage of Redis must not
            # pull all of them out of the load balancer at once.
            checks["redis"] = await redis_ping()
        return ready, checks


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


def create_ops_app(gateway: Gateway) -> web.Application:
    app = web.Application(middlewares=[no_store])
    app[OPS_GATEWAY] = gateway
    readiness = Readiness(gateway)
    token = gateway.config.admin.token

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(gateway.registry)
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ready, checks = await readiness.report()
        return _json({"ready": ready, "checks": checks}, 200 if ready else 503)

    async def jwks(_request: web.Request) -> web.Response:
        return _json(gateway.minter.jwks())

    def denied(request: web.Request) -> None:
        gateway.audit.admin(
            "admin_denied",
            client=admin_client(request),
            ok=False,
            method=request.method,
            path=request.path,
        )

    admin = admin_guard(token, on_denied=denied)

    async def cache_stats(_request: web.Request) -> web.Response:
        return _json(gateway.resolver.snapshot())

    async def cache_clear(request: web.Request) -> web.Response:
        await gateway.revoke_all()
        gateway.audit.admin("cache_clear", client=admin_client(request))
        return _json({"cleared": True})

    async def cache_drop(request: web.Request) -> web.Response:
        key_id = request.match_info["key_id"]
        dropped = await gateway.revoke_key_ids([key_id])
        gateway.audit.admin(
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
    app.router.add_post("/admin/revocations", admin(audited_webhook(gateway)))
    add_admin_routes(app, gateway, admin)
    store = local_store(gateway.tower)
    key_parts = KeyApiParts(
        store=store,
        audit=lambda: gateway.audit,
        revoke=gateway.revoke_key_ids,
        roles=lambda: gateway.config.roles,
    )
    add_key_routes(app, key_parts, admin)
    add_ui_routes(app, enabled=token is not None and store is not None)
    document = admin_openapi()

    async def openapi(_request: web.Request) -> web.Response:
        return _json(document)

    app.router.add_get(OPENAPI_PATH, admin(openapi))
    return app
