"""Open WebSockets per key_id, so an invalidation or a shutdown reaches them at once, and how
a connection ends (`Ending`): the close code and reason both sides are told.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import WSCloseCode, web
from prometheus_client import Counter

from gateway.errors import WS_UNAUTHORIZED
from gateway.ops.metrics import PREFIX, Metrics

# How long a closing handshake may take before the transport is simply cut.
CLOSE_TIMEOUT: Final = 5.0
DRAIN_POLL: Final = 0.05

# Codes a peer may send but an endpoint must never put in a close frame.
_NO_STATUS: Final = frozenset({0, 1005})
_ABNORMAL: Final = frozenset({1006, 1015})
_SENDABLE: Final = frozenset(int(c) for c in WSCloseCode) - _ABNORMAL


@dataclass(frozen=True, slots=True)
class Ending:
    """How a connection ends: the close code and reason both sides are told."""

    code: int
    reason: str = ""
    outcome: str | None = None  # handshake outcome, when the connection ends before the relay


GOING_AWAY: Final = Ending(WSCloseCode.GOING_AWAY, "going away")


def sendable(code: int | None) -> int:
    """A close code that may go on the wire for one a peer sent (or did not send)."""
    if code is None or code in _NO_STATUS:
        return WSCloseCode.OK
    if code in _ABNORMAL:
        return WSCloseCode.GOING_AWAY
    if code in _SENDABLE or 3000 <= code <= 4999:
        return code
    return WSCloseCode.PROTOCOL_ERROR


class Session:
    """One accepted client socket that the registry can ask to stop."""

    __slots__ = ("client", "finished", "key_id", "stopping")

    def __init__(self, client: web.WebSocketResponse) -> None:
        self.client = client
        self.key_id: str | None = None
        self.stopping: asyncio.Future[Ending] = asyncio.get_running_loop().create_future()
        self.finished = asyncio.Event()

    def stop(self, ending: Ending) -> None:
        if not self.stopping.done():
            self.stopping.set_result(ending)


@dataclass(frozen=True, slots=True)
class Direction:
    frames: Counter
    nbytes: Counter


class SocketRegistry:
    """Open WebSockets per key_id, so invalidation and shutdown reach them at once.

    Also owns the WebSocket metrics, registered on the gateway's registry.
    """

    def __init__(self, metrics: Metrics, *, drain_timeout: float) -> None:
        self.metrics = metrics
        registry = metrics.registry
        self.handshakes = Counter(
            PREFIX + "websocket_handshakes",
            "WebSocket upgrades by outcome",
            ["outcome"],
            registry=registry,
        )
        frames = Counter(
            PREFIX + "websocket_frames",
            "WebSocket messages relayed, by direction",
            ["direction"],
            registry=registry,
        )
        nbytes = Counter(
            PREFIX + "websocket_bytes",
            "WebSocket payload bytes relayed, by direction",
            ["direction"],
            registry=registry,
        )
        self.to_upstream = Direction(frames.labels("to_upstream"), nbytes.labels("to_upstream"))
        self.to_client = Direction(frames.labels("to_client"), nbytes.labels("to_client"))
        self._drain_timeout = drain_timeout
        self._sessions: set[Session] = set()
        self._by_key_id: dict[str, set[Session]] = {}
        self._handlers = 0
        self._closing: Ending | None = None
        self._shutdown: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def keep(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Runs `work` as a task referenced until it ends, so a shielded close survives."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """Counts WebSocket handlers, so shutdown can tell HTTP requests from sockets."""
        self._handlers += 1
        try:
            yield
        finally:
            self._handlers -= 1

    def open(self, client: web.WebSocketResponse) -> Session:
        session = Session(client)
        self._sessions.add(session)
        if self._closing is not None:
            session.stop(self._closing)
        return session

    def bind(self, session: Session, key_id: str) -> None:
        session.key_id = key_id
        self._by_key_id.setdefault(key_id, set()).add(session)

    def close(self, session: Session) -> None:
        self._sessions.discard(session)
        if session.key_id is not None:
            sessions = self._by_key_id.get(session.key_id)
            if sessions is not None:
                sessions.discard(session)
                if not sessions:
                    del self._by_key_id[session.key_id]
        session.finished.set()

    def invalidate_key_id(self, key_id: str) -> int:
        """Close every socket authenticated with this key_id (4401); returns how many."""
        sessions = list(self._by_key_id.get(key_id, ()))
        for session in sessions:
            session.stop(Ending(WS_UNAUTHORIZED, "API key invalidated"))
        return len(sessions)

    def invalidate_all(self) -> int:
        """Close every authenticated socket (4401); public-route sockets stay open."""
        sessions = [s for group in self._by_key_id.values() for s in group]
        for session in sessions:
            session.stop(Ending(WS_UNAUTHORIZED, "API key invalidated"))
        return len(sessions)

    async def close_all(self, ending: Ending = GOING_AWAY) -> None:
        """Close every socket, and refuse new ones, with `ending`; waits for them."""
        self._closing = ending
        sessions = list(self._sessions)
        for session in sessions:
            session.stop(ending)
        if sessions:
            waits = [asyncio.ensure_future(s.finished.wait()) for s in sessions]
            _, pending = await asyncio.wait(waits, timeout=CLOSE_TIMEOUT + 1.0)
            for wait in pending:
                wait.cancel()

    async def on_shutdown(self, _app: web.Application) -> None:
        """aiohttp's `on_shutdown` hook; returns at once so aiohttp can start draining.

        aiohttp calls `on_shutdown` before it waits for in-flight handlers, and
        a relayed socket is a handler that never ends by itself. So the closing
        runs beside the drain: once no HTTP request is in flight (or shortly
        before the drain deadline), every socket is closed with 1001 and its
        handler ends, which lets the drain finish.
        """
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._close_after_drain())

    async def _close_after_drain(self) -> None:
        loop = asyncio.get_running_loop()
        # Leave time for the closing handshakes inside the server's own deadline.
        deadline = loop.time() + max(0.0, self._drain_timeout - CLOSE_TIMEOUT)
        # Polled: the count is a plain integer of `Metrics`, which cannot notify.
        while self._http_in_flight() > 0 and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL)
        await self.close_all()

    def _http_in_flight(self) -> int:
        return self.metrics.in_flight - self._handlers
