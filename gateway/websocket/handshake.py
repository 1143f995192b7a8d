"""WebSocket: authenticated handshakes, first-message auth, and a faithful frame relay.

An upgrade on a `websocket: true` route is authenticated from its headers by
the same `decide()` as HTTP (enforced even on a shadow route); a refusal is a
plain HTTP error before the upgrade. With no key in the headers the gateway accepts the upgrade
and waits `websocket.auth_timeout` seconds for `{"type": "auth", "api_key": ...}`;
nothing reaches the upstream before that succeeds, and a refusal then is the
`Decision`'s close code. Frames are then relayed (`gateway.websocket.relay`),
and `SocketRegistry` closes a key's sockets at once when an admin invalidates
it. The rate limit counts an upgrade once, like one request; messages are not
counted.

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
from collections.abc import Callable
from typing import Any, Final

from aiohttp import (
    ClientError,
    ClientSession,
    ClientWebSocketResponse,
    ClientWSTimeout,
    WSCloseCode,
    WSMsgType,
    WSServerHandshakeError,
    hdrs,
    web,
)
from multidict import CIMultiDict
from yarl import URL

from gateway.auth.components import Components
from gateway.auth.decide import Decision, DecisionEngine, OriginalRequest
from gateway.auth.routes import Route
from gateway.errors import (
    WS_UNAUTHORIZED,
    BadRequest,
    Forbidden,
    GatewayError,
    MalformedKey,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.http.forwarded import add_forwarding
from gateway.http.headers import REQUEST_ID, HeaderPolicy, holds_key
from gateway.ops.accesslog import RequestRecord
from gateway.websocket.auth_message import BAD_AUTH_MESSAGE, auth_key
from gateway.websocket.registry import (
    CLOSE_TIMEOUT,
    GOING_AWAY,
    Ending,
    Session,
    SocketRegistry,
    sendable,
)
from gateway.websocket.relay import (
    Watchdog,
    Watched,
    close,
    error_ending,
    relay,
    send_error,
)
from gateway.websocket.upgrade import offered_protocols, origin, upstream_url

log = logging.getLogger("tower_gateway.websocket")

AUTH_TIMEOUT: Final = 4408


class WebSockets:
    """The proxy listener's upgrades: what each handshake needs, handed in narrow."""

    def __init__(
        self,
        *,
        engine: DecisionEngine,
        registry: SocketRegistry,
        sessions: Callable[[str], ClientSession],
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.sessions = sessions  # the upstream's pooled client session, by origin

    async def handle(
        self,
        request: web.BaseRequest,
        original: OriginalRequest,
        route: Route,
        path: str,
        query: str,
        headers: CIMultiDict[str],
        record: RequestRecord,
        parts: Components,
    ) -> web.StreamResponse:
        """Authenticate an upgrade, then relay it; `headers` are the forwardable client
        headers, `parts` the request's snapshot of the live config (a reload mid-handshake
        cannot mix two)."""
        registry = self.registry
        with registry.handling():
            try:
                handshake = _Handshake(self, request, original, route, record, parts)
                return await handshake.run(path, query, headers)
            except GatewayError as exc:
                registry.handshakes.labels(exc.reason).inc()
                raise


class _Handshake:
    """One upgrade request, from its headers to the end of its relay."""

    def __init__(
        self,
        sockets: WebSockets,
        request: web.BaseRequest,
        original: OriginalRequest,
        route: Route,
        record: RequestRecord,
        parts: Components,
    ) -> None:
        self.engine = sockets.engine
        self.sessions = sockets.sessions
        self.registry = sockets.registry
        self.request = request
        self.original = original
        self.route = route
        self.record = record
        self.parts = parts
        self.config = parts.config
        # Rate-limit headers of a header-authenticated upgrade, for its 101 answer.
        self.response_headers: dict[str, str] = {}
        self.refused = False  # the handshake ended on a refusal of `decide()`

    async def run(self, path: str, query: str, headers: CIMultiDict[str]) -> web.StreamResponse:
        request = self.request
        self._check_origin()
        # A key a browser carries as a subprotocol is offered to no upstream, and so
        # never chosen and echoed back either.
        offered = offered_protocols(request, self.parts.extractor.candidates(request.headers))
        # Refuse a broken handshake before any tower call or upstream connection.
        if not web.WebSocketResponse(protocols=offered).can_prepare(request).ok:
            raise BadRequest("not a valid WebSocket handshake", reason="malformed_request")
        upstream_headers = self._upstream_headers(headers)
        url = upstream_url(self.route, path, query)
        key = self.engine.key(self.original, self.parts) if self.route.config.auth else None
        if self.route.config.auth and key is None:
            return await self._first_message(url, upstream_headers, offered, path)

        decision = await self.engine.decide(
            self.original, self.record, parts=self.parts, route=self.route, path=path
        )
        if not decision.forwarded:
            assert decision.error is not None
            raise decision.error
        if decision.headers:
            self.response_headers.update(decision.headers)
        decision.upstream_headers(upstream_headers, self.config.jwt.header)
        upstream = await self._connect(url, upstream_headers, offered)
        client = await self._accept_after(upstream)
        session = self.registry.open(client)
        try:
            watchdog = None
            if key is not None and decision.resolved is not None:
                self.registry.bind(session, decision.resolved.identity.key_id)
                watchdog = self._watchdog(key, decision)
            outcome = "accepted" if key is not None else "public"
            return await relay(self.registry, session, upstream, outcome, watchdog)
        finally:
            self.registry.close(session)

    def _watchdog(self, key: str, decision: Decision) -> Watchdog:
        assert decision.resolved is not None
        engine = self.engine
        return Watchdog(
            Watched(key, decision.resolved, self.route),
            resolver=engine.resolver,
            components=engine.components,
            clock=engine.clock,
        )

    # ------------------------------------------------------------------ checks

    def _check_origin(self) -> None:
        allowed = self.config.websocket.allowed_origins
        if allowed is None:
            return
        origins = self.request.headers.getall(hdrs.ORIGIN, [])
        if not origins:
            return  # not a browser: Origin is what browsers send, others need not
        permitted = {origin(o) for o in allowed}
        if len(origins) > 1 or origin(origins[0]) not in permitted:
            raise Forbidden("Origin not allowed", reason="origin_not_allowed")

    # ------------------------------------------------------------------ upstream

    def _upstream_headers(self, headers: CIMultiDict[str]) -> CIMultiDict[str]:
        out: CIMultiDict[str] = CIMultiDict(
            (name, value)
            for name, value in headers.items()
            # The upstream handshake is the gateway's own: its key, version,
            # protocols and extensions are negotiated per hop.
            if not name.lower().startswith("sec-websocket-")
        )
        route = self.route
        add_forwarding(
            out,
            self.request,
            self.parts.trusted_proxies,
            self.record.request_id,
            upstream_host=route.upstream_host,
            preserve_host=route.config.preserve_host,
        )
        return out

    async def _connect(
        self, url: URL, headers: CIMultiDict[str], protocols: tuple[str, ...]
    ) -> ClientWebSocketResponse:
        route = self.route
        session = self.sessions(route.upstream_origin)
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
            await close(upstream, GOING_AWAY)
            raise
        return client

    async def _first_message(
        self, url: URL, headers: CIMultiDict[str], offered: tuple[str, ...], path: str
    ) -> web.StreamResponse:
        client = self._client_socket(offered[:1])
        await client.prepare(self.request)
        session = self.registry.open(client)
        try:
            return await self._authenticate_then_relay(session, url, headers, offered, path)
        except Exception:
            # The 101 is out: nothing but a close frame can tell the client now.
            log.exception("WebSocket handler failed in request %s", self.record.request_id)
            await close(client, Ending(WSCloseCode.INTERNAL_ERROR, "internal error"))
            return client
        finally:
            self.registry.close(session)

    async def _authenticate_then_relay(
        self,
        session: Session,
        url: URL,
        headers: CIMultiDict[str],
        offered: tuple[str, ...],
        path: str,
    ) -> web.WebSocketResponse:
        """First-message auth; only after it succeeds is the upstream connected."""
        client = session.client
        outcome = await self._authenticate_first(session, client, path)
        if isinstance(outcome, Ending):
            self._deny(outcome)
            await close(client, outcome)
            return client
        key, decision = outcome
        # A browser that sends its key in the auth message may hold it in a cookie too,
        # or offer it as a subprotocol (answered before the key was known): then the
        # connection ends, and the upstream never sees it.
        HeaderPolicy.scrub(headers, (key,))
        if client.ws_protocol is not None and holds_key(client.ws_protocol, (key,)):
            ending = Ending(BAD_AUTH_MESSAGE, "a subprotocol holds the key", "key_in_subprotocol")
            self._deny(ending)
            await close(client, ending)
            return client
        decision.upstream_headers(headers, self.config.jwt.header)
        try:
            upstream = await self._connect(url, headers, offered[:1])
        except GatewayError as exc:
            ending = Ending(exc.close_code, exc.detail, exc.reason)
            await send_error(client, "Upstream unavailable")
            self._deny(ending)
            await close(client, ending)
            return client
        if client.ws_protocol is not None and upstream.protocol != client.ws_protocol:
            # The reason names no protocol: a client's offer may hold anything.
            ending = Ending(
                WSCloseCode.BAD_GATEWAY, "upstream refused the subprotocol", "subprotocol_mismatch"
            )
            self._deny(ending)
            await asyncio.gather(close(client, ending), close(upstream, ending))
            return client
        watchdog = self._watchdog(key, decision)
        return await relay(self.registry, session, upstream, "accepted", watchdog)

    async def _authenticate_first(
        self, session: Session, client: web.WebSocketResponse, path: str
    ) -> Ending | tuple[str, Decision]:
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
                stopped = session.stopping.result()
                return Ending(stopped.code, stopped.reason, "shutting_down")
            return Ending(AUTH_TIMEOUT, "no auth message in time", "auth_timeout")

        msg = receive.result()
        if msg.type is WSMsgType.TEXT:
            key = auth_key(msg.data, self.config.credentials.max_key_length)
            if isinstance(key, Ending):
                if key.code != WS_UNAUTHORIZED:
                    return key
                # A malformed key: refused without a tower call, as a header's would be.
                decision = self.engine.refused(
                    MalformedKey(key.reason), self.record, self.route, path
                )
                return await self._refuse(client, decision)
        elif msg.type is WSMsgType.BINARY:
            return Ending(BAD_AUTH_MESSAGE, "expected a text auth message", "bad_auth_message")
        elif msg.type is WSMsgType.ERROR:
            return error_ending(msg.data)  # aiohttp has already closed the socket
        else:  # CLOSE, CLOSING, CLOSED: the client left before authenticating
            return Ending(sendable(client.close_code), "", "client_closed")

        decision = await self.engine.decide(
            self.original,
            self.record,
            parts=self.parts,
            route=self.route,
            path=path,
            credential=key,
        )
        if not decision.forwarded or decision.resolved is None or decision.grants is None:
            return await self._refuse(client, decision)
        identity = decision.resolved.identity
        self.registry.bind(session, identity.key_id)
        answer = {"type": "auth_ok", "user_id": identity.user_id, "role": decision.grants.role}
        try:
            await client.send_str(json.dumps(answer))
        except ConnectionError:
            return Ending(WSCloseCode.GOING_AWAY, "", "client_closed")
        return key, decision

    async def _refuse(self, client: web.WebSocketResponse, decision: Decision) -> Ending:
        """Tells the client why, in an error message; the close that follows says it again."""
        error = decision.error
        assert error is not None
        self.refused = True
        await send_error(client, error.client_message)
        return Ending(decision.close_code, error.close_reason, decision.reason)

    def _deny(self, ending: Ending) -> None:
        """Counts a handshake that ends before the relay; one that `decide()` refused is
        already recorded, any other ending (timeout, bad message, upstream) is an error."""
        outcome = ending.outcome or "closed"
        self.registry.handshakes.labels(outcome).inc()
        if not self.refused:
            self.record.decision, self.record.reason = "error", outcome
