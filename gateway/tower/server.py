"""The embedded tower served over HTTP: `POST /api/v1/validate` for other gateways.

Speaks exactly the remote tower contract (CONTRACT section 3), so a gateway
cannot tell it from any other tower.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import hdrs, web

from gateway.http.answers import json_error
from gateway.tower.local import flush_periodically
from gateway.tower.store import KeyStore

log = logging.getLogger(__name__)

STORE: Final = web.AppKey("tower_store", KeyStore)
MAX_REQUEST_BYTES: Final = 8192
SECRET_HEADER: Final = "X-Tower-Secret"


def _error(status: int, code: str, detail: str, **headers: str) -> web.Response:
    return json_error(status, code, detail, headers=headers)


def _same(given: str | None, expected: bytes) -> bool:
    # Constant-time, so the response time says nothing about how much matched;
    # surrogateescape, so a header that is not UTF-8 is a mismatch, not a crash.
    return hmac.compare_digest((given or "").encode("utf-8", "surrogateescape"), expected)


async def _read_bounded(request: web.Request) -> bytes | None:
    """The body, or None when it is larger than MAX_REQUEST_BYTES."""
    if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
        return None
    body = bytearray()
    while len(body) <= MAX_REQUEST_BYTES:
        chunk = await request.content.read(MAX_REQUEST_BYTES + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
    return None


def create_tower_app(
    store: KeyStore, *, api_key: str, secret: str, usage_flush_interval: float = 5.0
) -> web.Application:
    """An application answering `/api/v1/validate` from `store`; the caller owns the store."""
    if not api_key or not secret:
        raise ValueError("the served tower needs both an api_key and a secret")
    expected_auth = f"Bearer {api_key}".encode()
    expected_secret = secret.encode()

    async def validate(request: web.Request) -> web.Response:
        auth_ok = _same(request.headers.get(hdrs.AUTHORIZATION), expected_auth)
        secret_ok = _same(request.headers.get(SECRET_HEADER), expected_secret)
        if not (auth_ok and secret_ok):
            return _error(
                401,
                "unauthorized",
                "wrong or missing tower credentials",
                **{hdrs.WWW_AUTHENTICATE: 'Bearer realm="tower"'},
            )
        raw = await _read_bounded(request)
        if raw is None:
            return _error(400, "malformed_request", f"body over {MAX_REQUEST_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "malformed_request", "body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("api_key"), str):
            return _error(400, "malformed_request", 'body must be {"api_key": "<key>"}')
        try:
            answer = request.app[STORE].lookup(body["api_key"])
        except (sqlite3.Error, ValueError) as exc:
            log.error("key store lookup failed: %s: %s", type(exc).__name__, exc)
            return _error(500, "store_error", "the key store could not answer")
        return web.json_response(answer)

    async def healthz(request: web.Request) -> web.Response:
        if not request.app[STORE].ping():
            return _error(503, "store_unavailable", "the key store cannot be read")
        return web.json_response({"status": "ok"})

    async def usage_flusher(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(flush_periodically(app[STORE], usage_flush_interval))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            await asyncio.to_thread(app[STORE].flush_usage)
        except sqlite3.Error as exc:
            log.warning("final key usage flush failed: %s", exc)

    app = web.Application()
    app[STORE] = store
    app.cleanup_ctx.append(usage_flusher)
    app.router.add_post("/api/v1/validate", validate)
    app.router.add_get("/healthz", healthz)
    return app
