"""A demo upstream that answers every request with what it received, JWT claims included.

It shows everything on purpose (all headers, the decoded token), so it is for
the `demo` command and tests only, never for real traffic. WebSocket upgrades
get the same description as a first message, then an echo of every frame.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import jwt
from aiohttp import WSMsgType, hdrs, web

BODY_PREVIEW_BYTES: Final = 4096

JwtVerify = Callable[[str], dict[str, Any]]


def _claims(request: web.Request, header: str, verify: JwtVerify | None) -> dict[str, Any] | None:
    value = request.headers.get(header)
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return {"verified": False, "error": f"{header} is not 'Bearer <jwt>'"}
    token = token.strip()
    if verify is not None:
        try:
            return {"verified": True, "claims": verify(token)}
        except Exception as exc:  # the demo reports any verification failure, it never crashes
            result: dict[str, Any] = {"verified": False, "error": f"{type(exc).__name__}: {exc}"}
    else:
        result = {"verified": False}
    try:
        result["claims"] = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        result["error"] = f"not a JWT: {exc}"
    return result


def _describe(request: web.Request, header: str, verify: JwtVerify | None) -> dict[str, Any]:
    return {
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query": {k: request.query.getall(k) for k in request.query},
        "headers": {k: ", ".join(request.headers.getall(k)) for k in request.headers},
        "jwt": _claims(request, header, verify),
    }


async def _websocket(request: web.Request, described: dict[str, Any]) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_json(described)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


def create_demo_upstream(
    *, jwt_verify: JwtVerify | None = None, jwt_header: str = hdrs.AUTHORIZATION
) -> web.Application:
    """An application that echoes every request as JSON; `jwt_verify` checks the token."""

    async def echo(request: web.Request) -> web.StreamResponse:
        described = _describe(request, jwt_header, jwt_verify)
        if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
            return await _websocket(request, described)
        size = 0
        preview = bytearray()
        # Streamed, so a large upload is counted without being held in memory.
        async for chunk in request.content.iter_any():
            size += len(chunk)
            preview += chunk[: BODY_PREVIEW_BYTES - len(preview)]
        described["body"] = {
            "bytes": size,
            "preview": preview.decode("utf-8", errors="replace"),
        }
        return web.json_response(described)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app
