"""What a WebSocket upgrade request asks for: its subprotocols, its origin, and the URL of
the upstream handshake."""

from __future__ import annotations

from aiohttp import hdrs, web
from yarl import URL

from gateway.auth.routes import Route
from gateway.http.headers import MIN_SCRUBBED_KEY, holds_key


def offered_protocols(request: web.BaseRequest, keys: tuple[str, ...]) -> tuple[str, ...]:
    """The subprotocols the client offers, in order, without any that holds one of `keys`."""
    offered: list[str] = []
    for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ()):
        offered.extend(p.strip() for p in value.split(",") if p.strip())
    unique = tuple(dict.fromkeys(offered))
    return _without_keys(unique, keys) if keys and unique else unique


def _without_keys(offered: tuple[str, ...], keys: tuple[str, ...]) -> tuple[str, ...]:
    needles = [key for key in keys if len(key) >= MIN_SCRUBBED_KEY]
    if not needles:
        return offered
    return tuple(p for p in offered if not holds_key(p, needles))


def origin(value: str) -> str:
    return value.strip().lower().rstrip("/")


def upstream_url(route: Route, path: str, query: str) -> URL:
    base = route.upstream_origin
    scheme = "wss" if base.startswith("https://") else "ws"
    rest = base.split("://", 1)[1]
    return URL(
        f"{scheme}://{rest}{route.upstream_base}{path}{'?' + query if query else ''}",
        encoded=True,
    )
