"""WebSocket: authenticated handshakes, first-message auth, and a faithful frame relay.

An upgrade on a `websocket: true` route is authenticated from its headers with
the same policy as HTTP (`Gateway.authorize`); a refusal is a plain HTTP error
before the upgrade. With no key in the headers the gateway accepts the upgrade
and waits `websocket.auth_timeout` seconds for `{"type": "auth", "api_key": ...}`;
nothing reaches the upstream before that succeeds. Frames are then relayed one
at a time (each send awaited, so a slow reader slows its writer instead of
growing a buffer), and a connection never outlives its key: a watchdog closes
it when the key expires or fails revalidation, and `SocketRegistry` closes a
key's sockets at once when an admin invalidates it. A close code and reason
from either peer reach the other one (codes that may not go on the wire, such
as 1006, become 1000 or 1001). The rate limit counts an upgrade once, like one
request; messages are not counted.

Subprotocols: with header auth the upstream is connected first, offered every
protocol the client offered, and its choice is the answer to the client. With
first-message auth the answer must be given before the upstream is known, so
the gateway answers the client's first offer and offers the upstream only that
one; an upstream that does not accept it ends the connection with 1014.

Close codes the gateway sends on its own account:

    1001  gateway shutting down             4400  malformed auth message
    1008  auth message too large            4401  invalid, expired, revoked or
    1009  message over max_message_size           invalidated key
    1011  internal error                    4403  missing capability
    1013  tower unavailable                 4408  no auth message in time
    1014  upstream unreachable              4429  rate limited
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aiohttp import (
    ClientError,
    ClientWebSocketResponse,
    ClientWSTimeout,
    WSCloseCode,
    WSMsgType,
    WSServerHandshakeError,
    hdrs,
    web,
)
from aiohttp.http_websocket import WebSocketError
from multidict import CIMultiDict
from prometheus_client import Counter
from yarl import URL

from gateway.accesslog import RequestRecord
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    InvalidKey,
    RateLimited,
    TowerUnavailable,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.httpserver import REQUEST_ID
from gateway.metrics import PREFIX, Metrics
from gateway.proxy import MIN_SCRUBBED_KEY, HeaderPolicy, add_forwarding, holds_key
from gateway.routes import Route

if TYPE_CHECKING:
    from gateway.app import Authorization, Components, Gateway

log = logging.getLogger("tower_gateway.websocket")


# Before authentication a client gets only this much: an auth message is tiny,
# and an unauthenticated peer must not make the gateway parse big documents.
# Checked once the frame is read, so `max_message_size` bounds what reading it costs.
AUTH_MESSAGE_LIMIT: Final = 16 * 1024
# How long a closing handshake may take before the transport is simply cut.
CLOSE_TIMEOUT: Final = 5.0
# Upper bound on how long a watchdog sleeps between looks at its key: the
# latency of noticing a key another request found revoked.
CHECK_INTERVAL: Final = 1.0
# Revalidation happens when the cache's fresh period ends; with `cache.ttl: 0`
# this floor keeps one socket from calling the tower in a loop.
MIN_REVALIDATE_INTERVAL: Final = 1.0
DRAIN_POLL: Final = 0.05
MAX_REASON_BYTES: Final = 123  # RFC 6455: a close frame's payload is at most 125 bytes

BAD_AUTH_MESSAGE: Final = 4400
UNAUTHORIZED: Final = 4401
FORBIDDEN: Final = 4403
AUTH_TIMEOUT: Final = 4408
RATE_LIMITED: Final = 4429

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


def _reason(text: str) -> bytes:
    # Cut on a character boundary: a close reason must be valid UTF-8.
    return text.encode()[:MAX_REASON_BYTES].decode(errors="ignore").encode()


# --------------------------------------------------------------------------- registry


class _Session:
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
class _Direction:
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
        self.to_upstream = _Direction(frames.labels("to_upstream"), nbytes.labels("to_upstream"))
        self.to_client = _Direction(frames.labels("to_client"), nbytes.labels("to_client"))
        self._drain_timeout = drain_timeout
        self._sessions: set[_Session] = set()
        self._by_key_id: dict[str, set[_Session]] = {}
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

    def open(self, client: web.WebSocketResponse) -> _Session:
        session = _Session(client)
        self._sessions.add(session)
        if self._closing is not None:
            session.stop(self._closing)
        return session

    def bind(self, session: _Session, key_id: str) -> None:
        session.key_id = key_id
        self._by_key_id.setdefault(key_id, set()).add(session)

    def close(self, session: _Session) -> None:
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
            session.stop(Ending(UNAUTHORIZED, "API key invalidated"))
        return len(sessions)

    def invalidate_all(self) -> int:
        """Close every authenticated socket (4401); public-route sockets stay open."""
        sessions = [s for group in self._by_key_id.values() for s in group]
        for session in sessions:
            session.stop(Ending(UNAUTHORIZED, "API key invalidated"))
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


async def close_all(gateway: Gateway, code: int = WSCloseCode.GOING_AWAY) -> None:
    """Close every open WebSocket of `gateway` with `code` (1001 "going away" by default)."""
    await gateway.sockets.close_all(Ending(code, "going away"))


# --------------------------------------------------------------------------- handshake


async def handle_websocket(
    gateway: Gateway,
    request: web.BaseRequest,
    route: Route,
    path: str,
    query: str,
    headers: CIMultiDict[str],
    record: RequestRecord,
    parts: Components | None = None,
) -> web.StreamResponse:
    """Authenticate an upgrade, then relay it; `headers` are the forwardable client headers,
    `parts` the request's snapshot of the live config (a reload mid-handshake cannot mix two)."""
    sockets = gateway.sockets
    with sockets.handling():
        try:
            handshake = _Handshake(gateway, request, route, record, parts or gateway.components)
            return await handshake.run(path, query, headers)
        except GatewayError as exc:
            sockets.handshakes.labels(exc.reason).inc()
            raise


class _Handshake:
    """One upgrade request, from its headers to the end of its relay."""

    def __init__(
        self,
        gateway: Gateway,
        request: web.BaseRequest,
        route: Route,
        record: RequestRecord,
        parts: Components,
    ) -> None:
        self.gateway = gateway
        self.request = request
        self.route = route
        self.record = record
        self.parts = parts
        self.config = parts.config
        self.sockets = gateway.sockets
        # Rate-limit headers of a header-authenticated upgrade, for its 101 answer.
        self.response_headers: dict[str, str] = {}

    async def run(self, path: str, query: str, headers: CIMultiDict[str]) -> web.StreamResponse:
        request = self.request
        self._check_origin()
        offered = _offered_protocols(request)
        # A key a browser carries as a subprotocol is offered to no upstream, and so
        # never chosen and echoed back either.
        candidates = self.parts.extractor.candidates(request.headers)
        if candidates and offered:
            offered = _without_keys(offered, candidates)
        # Refuse a broken handshake before any tower call or upstream connection.
        if not web.WebSocketResponse(protocols=offered).can_prepare(request).ok:
            raise BadRequest("not a valid WebSocket handshake", reason="malformed_request")
        upstream_headers = self._upstream_headers(headers)
        url = _upstream_url(self.route, path, query)

        if not self.route.config.auth:
            self.record.decision, self.record.reason = "public", "public_route"
            upstream = await self._connect(url, upstream_headers, offered)
            client = await self._accept_after(upstream)
            return await self._relay(client, upstream, None, None, "public")

        key = self.parts.extractor.extract(request.headers)
        if key is not None:
            authorization = await self._authorize(key)
            upstream_headers[self.config.jwt.header] = f"Bearer {authorization.token}"
            upstream = await self._connect(url, upstream_headers, offered)
            client = await self._accept_after(upstream)
            return await self._relay(client, upstream, key, authorization, "accepted")

        return await self._first_message(url, upstream_headers, offered)

    # ------------------------------------------------------------------ checks

    def _check_origin(self) -> None:
        allowed = self.config.websocket.allowed_origins
        if allowed is None:
            return
        origins = self.request.headers.getall(hdrs.ORIGIN, [])
        if not origins:
            return  # not a browser: Origin is what browsers send, others need not
        permitted = {_origin(o) for o in allowed}
        if len(origins) > 1 or _origin(origins[0]) not in permitted:
            raise Forbidden("Origin not allowed", reason="origin_not_allowed")

    async def _authorize(self, key: str) -> Authorization:
        try:
            authorization = await self.gateway.authorize(
                key, self.route, self.record, self.response_headers, parts=self.parts
            )
        except GatewayError as exc:
            self.gateway.metrics.count_auth(exc.reason)
            raise
        self.gateway.metrics.count_auth("success")
        return authorization

    # ------------------------------------------------------------------ upstream

    def _upstream_headers(self, headers: CIMultiDict[str]) -> CIMultiDict[str]:
        request = self.request
        out: CIMultiDict[str] = CIMultiDict(
            (name, value)
            for name, value in headers.items()
            # The upstream handshake is the gateway's own: its key, version,
            # protocols and extensions are negotiated per hop.
            if not name.lower().startswith("sec-websocket-")
        )
        add_forwarding(out, request, self.route, self.parts.trusted_proxies, self.record.request_id)
        return out

    async def _connect(
        self, url: URL, headers: CIMultiDict[str], protocols: tuple[str, ...]
    ) -> ClientWebSocketResponse:
        route = self.route
        session = self.gateway.forwarder.session(route.upstream_origin)
        try:
            async with asyncio.timeout(route.config.timeout):
                return await session.ws_connect(
                    url,
                    headers=headers,
                    protocols=protocols,
                    autoclose=False,  # close codes are relayed, not answered by aiohttp
                    autoping=True,
                    max_msg_size=self.config.websocket.max_message_size,
                    timeout=ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                )
        except TimeoutError:
            raise UpstreamTimeout(
                f"upstream did not accept the WebSocket within {route.config.timeout:g}s"
            ) from None
        except WSServerHandshakeError as exc:
            raise UpstreamUnavailable(
                f"upstream refused the WebSocket upgrade ({exc.status})"
            ) from None
        except (ClientError, OSError) as exc:
            raise UpstreamUnavailable(f"upstream unavailable ({type(exc).__name__})") from None

    # ------------------------------------------------------------------ client

    def _client_socket(self, protocols: tuple[str, ...]) -> web.WebSocketResponse:
        client = web.WebSocketResponse(
            protocols=protocols,
            autoclose=False,
            autoping=True,
            max_msg_size=self.config.websocket.max_message_size,
            timeout=CLOSE_TIMEOUT,
        )
        client.headers.update(self.response_headers)
        client.headers[REQUEST_ID] = self.record.request_id
        return client

    async def _accept_after(self, upstream: ClientWebSocketResponse) -> web.WebSocketResponse:
        """Answers the client's upgrade with the protocol the upstream chose."""
        client = self._client_socket((upstream.protocol,) if upstream.protocol else ())
        try:
            await client.prepare(self.request)
        except BaseException:
            await _close(upstream, GOING_AWAY)
            raise
        return client

    async def _first_message(
        self, url: URL, headers: CIMultiDict[str], offered: tuple[str, ...]
    ) -> web.StreamResponse:
        client = self._client_socket(offered[:1])
        await client.prepare(self.request)
        session = self.sockets.open(client)
        try:
            return await self._authenticate_then_relay(session, url, headers, offered)
        except Exception:
            # The 101 is out: nothing but a close frame can tell the client now.
            log.exception("WebSocket handler failed in request %s", self.record.request_id)
            await _close(client, Ending(WSCloseCode.INTERNAL_ERROR, "internal error"))
            return client
        finally:
            self.sockets.close(session)

    async def _authenticate_then_relay(
        self, session: _Session, url: URL, headers: CIMultiDict[str], offered: tuple[str, ...]
    ) -> web.WebSocketResponse:
        """First-message auth; only after it succeeds is the upstream connected."""
        client = session.client
        outcome = await self._authenticate_first(session, client)
        if isinstance(outcome, Ending):
            self._deny(outcome)
            await _close(client, outcome)
            return client
        key, authorization = outcome
        # A browser that sends its key in the auth message may hold it in a cookie too,
        # or offer it as a subprotocol (answered before the key was known): then the
        # connection ends, and the upstream never sees it.
        HeaderPolicy.scrub(headers, (key,))
        if client.ws_protocol is not None and holds_key(client.ws_protocol, (key,)):
            ending = Ending(BAD_AUTH_MESSAGE, "a subprotocol holds the key", "key_in_subprotocol")
            self._deny(ending)
            await _close(client, ending)
            return client
        headers[self.config.jwt.header] = f"Bearer {authorization.token}"
        try:
            upstream = await self._connect(url, headers, offered[:1])
        except GatewayError as exc:
            ending = Ending(WSCloseCode.BAD_GATEWAY, exc.detail, exc.reason)
            await _send_error(client, "Upstream unavailable")
            self._deny(ending)
            await _close(client, ending)
            return client
        if client.ws_protocol is not None and upstream.protocol != client.ws_protocol:
            # The reason names no protocol: a client's offer may hold anything.
            ending = Ending(
                WSCloseCode.BAD_GATEWAY, "upstream refused the subprotocol", "subprotocol_mismatch"
            )
            self._deny(ending)
            await asyncio.gather(_close(client, ending), _close(upstream, ending))
            return client
        return await self._relay_session(session, upstream, key, authorization, "accepted")

    async def _authenticate_first(
        self, session: _Session, client: web.WebSocketResponse
    ) -> Ending | tuple[str, Authorization]:
        """Waits for the auth message; an `Ending` says why the connection must close."""
        receive = asyncio.ensure_future(client.receive())
        waiters: set[asyncio.Future[Any]] = {receive, session.stopping}
        done, _ = await asyncio.wait(
            waiters,
            timeout=self.config.websocket.auth_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if receive not in done:
            receive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receive
            if session.stopping.done():
                return _with_outcome(session.stopping.result(), "shutting_down")
            return Ending(AUTH_TIMEOUT, "no auth message in time", "auth_timeout")

        msg = receive.result()
        if msg.type is WSMsgType.TEXT:
            key = _auth_key(msg.data, self.config.credentials.max_key_length)
            if isinstance(key, Ending):
                if key.code == UNAUTHORIZED:  # a malformed key: refused without a tower call
                    self.gateway.metrics.count_auth("malformed_key")
                    await _send_error(client, "Invalid API key")
                return key
        elif msg.type is WSMsgType.BINARY:
            return Ending(BAD_AUTH_MESSAGE, "expected a text auth message", "bad_auth_message")
        elif msg.type is WSMsgType.ERROR:
            return _error_ending(msg.data)  # aiohttp has already closed the socket
        else:  # CLOSE, CLOSING, CLOSED: the client left before authenticating
            return Ending(sendable(client.close_code), "", "client_closed")

        try:
            authorization = await self._authorize(key)
        except GatewayError as exc:
            message, ending = _denial(exc)
            await _send_error(client, message)
            return ending
        identity = authorization.resolved.identity
        self.sockets.bind(session, identity.key_id)
        answer = {"type": "auth_ok", "user_id": identity.user_id, "role": authorization.grants.role}
        try:
            await client.send_str(json.dumps(answer))
        except ConnectionError:
            return Ending(WSCloseCode.GOING_AWAY, "", "client_closed")
        return key, authorization

    def _deny(self, ending: Ending) -> None:
        outcome = ending.outcome or "closed"
        self.sockets.handshakes.labels(outcome).inc()
        denied = ending.code in (UNAUTHORIZED, FORBIDDEN, RATE_LIMITED)
        self.record.decision = "deny" if denied else "error"
        self.record.reason = outcome

    # ------------------------------------------------------------------ relay

    async def _relay(
        self,
        client: web.WebSocketResponse,
        upstream: ClientWebSocketResponse,
        key: str | None,
        authorization: Authorization | None,
        outcome: str,
    ) -> web.WebSocketResponse:
        session = self.sockets.open(client)
        try:
            if authorization is not None:
                self.sockets.bind(session, authorization.resolved.identity.key_id)
            return await self._relay_session(session, upstream, key, authorization, outcome)
        finally:
            self.sockets.close(session)

    async def _relay_session(
        self,
        session: _Session,
        upstream: ClientWebSocketResponse,
        key: str | None,
        authorization: Authorization | None,
        outcome: str,
    ) -> web.WebSocketResponse:
        client = session.client
        sockets = self.sockets
        sockets.handshakes.labels(outcome).inc()
        gauge = sockets.metrics.websocket_connections
        gauge.inc()
        tasks: list[asyncio.Task[Ending]] = [
            asyncio.create_task(_pump(client, upstream, sockets.to_upstream)),
            asyncio.create_task(_pump(upstream, client, sockets.to_client)),
        ]
        if key is not None and authorization is not None:
            tasks.append(asyncio.create_task(_Watchdog(self, key, authorization).run()))
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
                await asyncio.shield(sockets.keep(_finish(tasks, client, upstream, ending)))
        finally:
            gauge.dec()
        return client


class _Watchdog:
    """Ends a relayed connection when its key stops being valid."""

    def __init__(self, handshake: _Handshake, key: str, authorization: Authorization) -> None:
        self._gateway = handshake.gateway
        self._route = handshake.route
        self._key = key
        self._identity = authorization.resolved.identity
        self._digest = authorization.resolved.digest

    async def run(self) -> Ending:
        gateway = self._gateway
        clock = gateway.clock
        interval = max(gateway.components.config.cache.ttl, MIN_REVALIDATE_INTERVAL)
        revalidate_at = clock() + interval
        while True:
            now = clock()
            if self._identity.expired(now):
                return Ending(UNAUTHORIZED, "API key has expired")
            # An entry gone from the cache was evicted, expired, or dropped
            # because the tower refused the key to another request: ask again.
            if now >= revalidate_at or gateway.resolver.peek(self._digest) is None:
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
        gateway = self._gateway
        try:
            resolved = await gateway.resolver.resolve(self._key)
        except InvalidKey as exc:
            return Ending(UNAUTHORIZED, exc.detail)
        except TowerUnavailable:
            return Ending(WSCloseCode.TRY_AGAIN_LATER, "Service unavailable")
        self._identity = resolved.identity
        missing = gateway.components.mapper.grants(resolved.identity).missing(self._route.require)
        if missing is not None:
            return Ending(FORBIDDEN, f"Missing required capability: {missing}")
        return None


async def _pump(
    source: web.WebSocketResponse | ClientWebSocketResponse,
    sink: web.WebSocketResponse | ClientWebSocketResponse,
    direction: _Direction,
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
                return _error_ending(msg.data)
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
    await asyncio.gather(_close(client, ending), _close(upstream, ending))


async def _close(ws: web.WebSocketResponse | ClientWebSocketResponse, ending: Ending) -> None:
    """Closes one side; a peer that does not answer in time has its transport cut."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close(code=ending.code, message=_reason(ending.reason))
    except (TimeoutError, ConnectionError):
        pass
    except Exception:
        log.exception("closing a WebSocket failed")


async def _send_error(client: web.WebSocketResponse, message: str) -> None:
    with contextlib.suppress(ConnectionError):
        await client.send_str(json.dumps({"type": "error", "message": message}))


# --------------------------------------------------------------------------- helpers


def _auth_key(text: str, max_key_length: int) -> str | Ending:
    """The key of a first message, or why the message is not an auth message."""
    if len(text) > AUTH_MESSAGE_LIMIT:
        return Ending(
            WSCloseCode.POLICY_VIOLATION, "auth message too large", "auth_message_too_large"
        )
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: `[[[[...` nested too deep
        return Ending(BAD_AUTH_MESSAGE, "auth message is not JSON", "bad_auth_message")
    if not isinstance(body, dict) or body.get("type") != "auth":
        return Ending(
            BAD_AUTH_MESSAGE, 'expected {"type": "auth", "api_key": ...}', "bad_auth_message"
        )
    key = body.get("api_key")
    if not isinstance(key, str):
        return Ending(BAD_AUTH_MESSAGE, "api_key must be a string", "bad_auth_message")
    # The same shape rule as header keys: printable ASCII without space.
    if (
        not key
        or len(key) > max_key_length
        or not (key.isascii() and key.isprintable() and " " not in key)
    ):
        return Ending(UNAUTHORIZED, "malformed API key", "malformed_key")
    return key


def _denial(exc: GatewayError) -> tuple[str, Ending]:
    """The error message and close a failed first-message authentication gets."""
    if isinstance(exc, InvalidKey):
        return "Invalid API key", Ending(UNAUTHORIZED, exc.detail, exc.reason)
    if isinstance(exc, TowerUnavailable):
        return "Service unavailable", Ending(
            WSCloseCode.TRY_AGAIN_LATER, "Service unavailable", exc.reason
        )
    if isinstance(exc, Forbidden):
        return exc.detail, Ending(FORBIDDEN, exc.detail, exc.reason)
    if isinstance(exc, RateLimited):
        return exc.detail, Ending(RATE_LIMITED, exc.detail, exc.reason)
    return exc.detail, Ending(WSCloseCode.INTERNAL_ERROR, exc.detail, exc.reason)


def _error_ending(exc: object) -> Ending:
    if isinstance(exc, WebSocketError):
        if exc.code == WSCloseCode.MESSAGE_TOO_BIG:
            return Ending(exc.code, "message too big", "message_too_big")
        return Ending(sendable(exc.code), "protocol error", "protocol_error")
    return Ending(WSCloseCode.GOING_AWAY, "connection error", "client_closed")


def _with_outcome(ending: Ending, outcome: str) -> Ending:
    return Ending(ending.code, ending.reason, outcome)


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


def _offered_protocols(request: web.BaseRequest) -> tuple[str, ...]:
    offered: list[str] = []
    for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ()):
        offered.extend(p.strip() for p in value.split(",") if p.strip())
    return tuple(dict.fromkeys(offered))


def _without_keys(offered: tuple[str, ...], keys: tuple[str, ...]) -> tuple[str, ...]:
    needles = [key for key in keys if len(key) >= MIN_SCRUBBED_KEY]
    if not needles:
        return offered
    return tuple(p for p in offered if not holds_key(p, needles))


def _origin(value: str) -> str:
    return value.strip().lower().rstrip("/")


def _upstream_url(route: Route, path: str, query: str) -> URL:
    origin = route.upstream_origin
    scheme = "wss" if origin.startswith("https://") else "ws"
    rest = origin.split("://", 1)[1]
    return URL(
        f"{scheme}://{rest}{route.upstream_base}{path}{'?' + query if query else ''}",
        encoded=True,
    )
