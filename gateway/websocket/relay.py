"""The frame relay of an authenticated WebSocket, and the watchdog that ends it with its key.

Frames are relayed one at a time (each send awaited, so a slow reader slows its
writer instead of growing a buffer). A close code and reason from either peer
reach the other one (codes that may not go on the wire, such as 1006, become
1000 or 1001). A connection never outlives its key: the watchdog closes it when
the key expires, fails revalidation or loses the route's capability.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import ClientWebSocketResponse, WSCloseCode, WSMsgType, web
from aiohttp.http_websocket import WebSocketError

from gateway.auth.components import Components
from gateway.auth.identity import IdentityResolver, Resolved
from gateway.auth.routes import Route
from gateway.errors import WS_UNAUTHORIZED, Forbidden, InvalidKey, TowerUnavailable
from gateway.websocket.registry import (
    CLOSE_TIMEOUT,
    DRAIN_POLL,
    GOING_AWAY,
    Direction,
    Ending,
    Session,
    SocketRegistry,
    sendable,
)

log = logging.getLogger("tower_gateway.websocket")

# Upper bound on how long a watchdog sleeps between looks at its key: the
# latency of noticing a key another request found revoked.
CHECK_INTERVAL: Final = 1.0
# Revalidation happens when the cache's fresh period ends; with `cache.ttl: 0`
# this floor keeps one socket from calling the tower in a loop.
MIN_REVALIDATE_INTERVAL: Final = 1.0
MAX_REASON_BYTES: Final = 123  # RFC 6455: a close frame's payload is at most 125 bytes


@dataclass(frozen=True, slots=True)
class Watched:
    """What the watchdog of one connection checks: its key, who it was, and its route."""

    key: str
    resolved: Resolved
    route: Route


async def relay(
    registry: SocketRegistry,
    session: Session,
    upstream: ClientWebSocketResponse,
    outcome: str,
    watchdog: Watchdog | None,
) -> web.WebSocketResponse:
    """Relays both ways until either side closes, the registry stops the session or the
    watchdog ends it; then closes both sides with the same code and reason."""
    client = session.client
    registry.handshakes.labels(outcome).inc()
    gauge = registry.metrics.websocket_connections
    gauge.inc()
    tasks: list[asyncio.Task[Ending]] = [
        asyncio.create_task(_pump(client, upstream, registry.to_upstream)),
        asyncio.create_task(_pump(upstream, client, registry.to_client)),
    ]
    if watchdog is not None:
        tasks.append(asyncio.create_task(watchdog.run()))
    waiters: list[asyncio.Future[Ending]] = [*tasks, session.stopping]
    try:
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also reached when the handler is cancelled (its client's
            # transport went away): a result already there still says best
            # how the connection ended, and the closing is shielded so the
            # upstream still gets its close frame.
            ending = _first_ending(waiters)
            await asyncio.shield(registry.keep(_finish(tasks, client, upstream, ending)))
    finally:
        gauge.dec()
    return client


class Watchdog:
    """Ends a relayed connection when its key stops being valid."""

    def __init__(
        self,
        watched: Watched,
        *,
        resolver: IdentityResolver,
        components: Callable[[], Components],
        clock: Callable[[], float],
    ) -> None:
        self._resolver = resolver
        self._components = components
        self._clock = clock
        self._route = watched.route
        self._key = watched.key
        self._identity = watched.resolved.identity
        self._digest = watched.resolved.digest

    async def run(self) -> Ending:
        clock = self._clock
        interval = max(self._components().config.cache.ttl, MIN_REVALIDATE_INTERVAL)
        revalidate_at = clock() + interval
        while True:
            now = clock()
            if self._identity.expired(now):
                return Ending(WS_UNAUTHORIZED, "API key has expired")
            # An entry gone from the cache was evicted, expired, or dropped
            # because the tower refused the key to another request: ask again.
            if now >= revalidate_at or self._resolver.peek(self._digest) is None:
                ending = await self._revalidate()
                if ending is not None:
                    return ending
                revalidate_at = clock() + interval
                now = clock()
            delay = min(CHECK_INTERVAL, revalidate_at - now)
            if self._identity.expires_at is not None:
                delay = min(delay, self._identity.expires_at - now)
            await asyncio.sleep(max(delay, DRAIN_POLL))

    async def _revalidate(self) -> Ending | None:
        try:
            resolved = await self._resolver.resolve(self._key)
        except (InvalidKey, TowerUnavailable) as exc:
            return Ending(exc.close_code, exc.close_reason)
        self._identity = resolved.identity
        grants = self._components().mapper.grants(resolved.identity)
        missing = grants.missing(self._route.require)
        if missing is not None:
            denial = Forbidden(f"Missing required capability: {missing}")
            return Ending(denial.close_code, denial.close_reason)
        return None


async def _pump(
    source: web.WebSocketResponse | ClientWebSocketResponse,
    sink: web.WebSocketResponse | ClientWebSocketResponse,
    direction: Direction,
) -> Ending:
    """Relays messages until `source` closes; returns how it closed."""
    while True:
        msg = await source.receive()
        kind = msg.type
        try:
            if kind is WSMsgType.TEXT:
                text: str = msg.data
                await sink.send_str(text)
                size = len(text.encode())
            elif kind is WSMsgType.BINARY:
                data: bytes = msg.data
                await sink.send_bytes(data)
                size = len(data)
            elif kind is WSMsgType.CLOSE:
                return Ending(sendable(msg.data), msg.extra or "")
            elif kind is WSMsgType.ERROR:
                return error_ending(msg.data)
            else:  # CLOSING, CLOSED: gone without a close frame, or closed by us
                return Ending(sendable(source.close_code), "")
        except ConnectionError:
            return GOING_AWAY  # the sink is gone; its own pump reports how
        direction.frames.inc()
        direction.nbytes.inc(size)


async def _finish(
    pumps: list[asyncio.Task[Ending]],
    client: web.WebSocketResponse,
    upstream: ClientWebSocketResponse,
    ending: Ending,
) -> None:
    """Stops the pumps, then closes both sides with the same code and reason."""
    for pump in pumps:
        pump.cancel()
    await asyncio.gather(*pumps, return_exceptions=True)
    await asyncio.gather(close(client, ending), close(upstream, ending))


async def close(ws: web.WebSocketResponse | ClientWebSocketResponse, ending: Ending) -> None:
    """Closes one side; a peer that does not answer in time has its transport cut."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close(code=ending.code, message=_reason(ending.reason))
    except (TimeoutError, ConnectionError):
        pass
    except Exception:
        log.exception("closing a WebSocket failed")


async def send_error(client: web.WebSocketResponse, message: str) -> None:
    with contextlib.suppress(ConnectionError):
        await client.send_str(json.dumps({"type": "error", "message": message}))


def error_ending(exc: object) -> Ending:
    if isinstance(exc, WebSocketError):
        if exc.code == WSCloseCode.MESSAGE_TOO_BIG:
            return Ending(exc.code, "message too big", "message_too_big")
        return Ending(sendable(exc.code), "protocol error", "protocol_error")
    return Ending(WSCloseCode.GOING_AWAY, "connection error", "client_closed")


def _first_ending(futures: list[asyncio.Future[Ending]]) -> Ending:
    """The first finished future's ending, in order: a peer's own close wins over a stop."""
    for future in futures:
        if not future.done() or future.cancelled():
            continue
        exc = future.exception()
        if exc is not None:
            log.error("WebSocket relay failed", exc_info=exc)
            return Ending(WSCloseCode.INTERNAL_ERROR, "internal error")
        return future.result()
    return GOING_AWAY


def _reason(text: str) -> bytes:
    # Cut on a character boundary: a close reason must be valid UTF-8.
    return text.encode()[:MAX_REASON_BYTES].decode(errors="ignore").encode()
