"""HTTP forwarding: headers rewritten once, bodies streamed both ways, faults classified.

Nothing is buffered whole: the request body is handed to the upstream as it
arrives and the response body is written to the client chunk by chunk. A
response whose declared length fits in one chunk goes out as one write, its
head with its body, as the first chunk of a streamed one would have been read
whole before anything was written anyway. One pooled `ClientSession` per
upstream origin; no cookies are kept between clients.

`routes[].timeout` bounds the upstream (`gateway.proxy.deadlines`, one tick for all
requests rather than a timer each): its time to send the response head, and a
small body with it, then its longest silence while it streams a larger body, as
nginx's `proxy_read_timeout` does. While the client uploads, the deadline
restarts with every chunk it delivers, so a slow upload is not a slow upstream,
yet one that stalls, or an upstream that stops reading, is cut off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Final

from aiohttp import (
    ClientConnectionError,
    ClientError,
    ClientPayloadError,
    ClientRequest,
    ClientResponse,
    ClientSession,
    ClientTimeout,
    DummyCookieJar,
    HttpVersion11,
    TCPConnector,
    hdrs,
    web,
)
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import LooseHeaders
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict
from yarl import URL

from gateway.auth.routes import Route
from gateway.errors import BadRequest, PayloadTooLarge, UpstreamTimeout, UpstreamUnavailable
from gateway.http.headers import HOP_BY_HOP, connection_tokens
from gateway.proxy.deadlines import Deadlines

log = logging.getLogger("tower_gateway.proxy")

RESPONSE_DROP: Final = HOP_BY_HOP | {"content-length"}
CHUNK: Final = 64 * 1024
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# Answers that never carry a body, whatever their Content-Length says.
BODILESS_STATUSES: Final = frozenset({100, 101, 102, 103, 204, 304})


class UpstreamRequest(ClientRequest):
    """An aiohttp client request that sends the headers it is given and no others.

    aiohttp adds `Accept`, `Accept-Encoding`, `User-Agent` and, on a body without
    one, `Content-Type` of its own; the upstream must get the client's request as
    it was. The headers come from `HeaderPolicy` with `Host` set, so they are
    taken in one copy instead of aiohttp's loop over them.
    """

    def update_headers(self, headers: LooseHeaders | None) -> None:
        self.headers = CIMultiDict(headers or ())
        if hdrs.HOST not in self.headers:
            super().update_headers(headers)

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = NO_AUTO_HEADERS


# Read-only: `UpstreamRequest` shares it among all requests.
NO_AUTO_HEADERS: Final[CIMultiDict[None]] = CIMultiDict(
    (name, None) for name in (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE)
)


class Forwarder:
    """Sends a request to its route's upstream and streams the answer back."""

    def __init__(self, *, max_body_size: int | None) -> None:
        self._max_body = max_body_size
        self._sessions: dict[str, ClientSession] = {}
        self._deadlines = Deadlines()
        self._loop: asyncio.AbstractEventLoop | None = None

    def session(self, origin: str) -> ClientSession:
        session = self._sessions.get(origin)
        if session is None or session.closed:
            session = ClientSession(
                connector=TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
                # Each exchange runs under its route's deadline (`gateway.proxy.deadlines`).
                timeout=ClientTimeout(total=None, sock_connect=10),
                auto_decompress=False,
                cookie_jar=DummyCookieJar(),
                request_class=UpstreamRequest,
            )
            self._sessions[origin] = session
        return session

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    def check_length(self, request: web.BaseRequest) -> None:
        limit = self._max_body
        if (
            limit is not None
            and request.content_length is not None
            and (request.content_length > limit)
        ):
            raise PayloadTooLarge(f"request body larger than {limit} bytes")

    async def forward(
        self,
        request: web.BaseRequest,
        route: Route,
        path: str,
        query: str,
        headers: CIMultiDict[str],
        response_headers: Mapping[str, str],
    ) -> web.StreamResponse:
        url = URL(
            f"{route.upstream_origin}{route.upstream_base}{path}{'?' + query if query else ''}",
            encoded=True,
        )
        session = self.session(route.upstream_origin)
        seconds = route.config.timeout
        task = self._current_task()
        state: _BodyState | None = None
        data: AsyncIterator[bytes] | None = None
        if request.body_exists:
            state = _BodyState(self._deadlines, task, seconds)
            # `clientguard.check_request` let through no other expectation.
            state.expects_continue = (
                request.version == HttpVersion11 and hdrs.EXPECT in request.headers
            )
            data = self._body(request, state)
        deadlines = self._deadlines
        deadlines.arm(task, seconds)
        try:
            upstream = await session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False
            )
            try:
                whole = await _read_whole(request, upstream)
            except BaseException:
                upstream.close()
                raise
        except asyncio.CancelledError:
            if deadlines.finish(task):
                raise _upstream_failure(TimeoutError(), route) from None
            raise
        except (TimeoutError, ClientError, OSError, _TooLarge, asyncio.IncompleteReadError) as exc:
            deadlines.finish(task)
            # aiohttp reports a failing body as a connection error: the flag,
            # not the exception type, says the client sent too much.
            if state is not None and state.too_large:
                raise PayloadTooLarge(f"request body larger than {self._max_body} bytes") from None
            if state is not None and state.client_failed:
                # The client's body broke its own framing (or the client left): the
                # upstream got a cut-off request, the client a 400, and nothing more
                # is read from this connection.
                raise BadRequest(
                    "the request body is malformed or incomplete", close=True
                ) from None
            raise _upstream_failure(exc, route) from None
        except BaseException:
            deadlines.finish(task)
            raise
        deadlines.finish(task)
        if whole is not None:
            # Head and body in one write.
            try:
                return web.Response(
                    status=upstream.status,
                    reason=upstream.reason,
                    headers=_response_headers(upstream, response_headers),
                    body=whole,
                )
            finally:
                upstream.release()
        return await self._relay(request, upstream, response_headers, task, seconds)

    def _current_task(self) -> asyncio.Task[object]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)  # the loop passed: no lookup of the running one
        assert task is not None
        return task

    async def _body(self, request: web.BaseRequest, state: _BodyState) -> AsyncIterator[bytes]:
        limit, seen = self._max_body, 0
        if state.expects_continue:
            # The request passed every check and the upstream is ready for the
            # body: now the client may send it.
            await request.writer.write(CONTINUE)
            # Not part of the response: a failure after this may still answer.
            request.writer.output_size = 0
        chunks = request.content.iter_any()
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except (RequestPayloadError, HttpProcessingError, ConnectionError):
                state.client_failed = True
                raise _TooLarge from None
            state.progress()
            seen += len(chunk)
            if limit is not None and seen > limit:
                state.too_large = True
                raise _TooLarge
            yield chunk
        state.progress()

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: ClientResponse,
        response_headers: Mapping[str, str],
        task: asyncio.Task[object],
        seconds: float,
    ) -> web.StreamResponse:
        """Streams a body too large for one chunk, or of unknown length."""
        try:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=_response_headers(upstream, response_headers),
            )
            length = _declared_length(upstream)
            if length is not None:
                response.content_length = length
            await response.prepare(request)
            deadlines, content = self._deadlines, upstream.content
            while True:
                # The deadline counts the upstream's silence, not a slow client's.
                deadlines.arm(task, seconds)
                try:
                    chunk = await content.read(CHUNK)
                except asyncio.CancelledError:
                    if not deadlines.finish(task):
                        raise
                    return _broken_off(request, upstream, response, "TimeoutError")
                except (ClientPayloadError, ClientConnectionError) as exc:
                    deadlines.finish(task)
                    return _broken_off(request, upstream, response, type(exc).__name__)
                except BaseException:
                    deadlines.finish(task)
                    raise
                deadlines.finish(task)
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            upstream.release()


def _response_headers(upstream: ClientResponse, extra: Mapping[str, str]) -> CIMultiDict[str]:
    """The upstream's headers less hop-by-hop ones (and those its `Connection` names) and
    `Content-Length` (aiohttp sets it), plus the gateway's own."""
    headers: CIMultiDict[str] = CIMultiDict()
    tokens = connection_tokens(upstream.headers)
    for name, value in upstream.headers.items():
        low = name.lower()
        if low not in RESPONSE_DROP and low not in tokens:
            headers.add(name, value)
    headers.update(extra)
    return headers


def _declared_length(upstream: ClientResponse) -> int | None:
    """The body's length, when the upstream said it (and not in chunks)."""
    if hdrs.TRANSFER_ENCODING in upstream.headers:
        return None
    return upstream.content_length


async def _read_whole(request: web.BaseRequest, upstream: ClientResponse) -> bytes | None:
    """The whole body when it fits in one chunk (so the answer can go out in one write),
    else None: it is streamed."""
    length = _declared_length(upstream)
    if (
        length is None
        or length > CHUNK
        or upstream.status in BODILESS_STATUSES
        or request.method == hdrs.METH_HEAD
    ):
        return None
    return await upstream.content.readexactly(length)


def _broken_off(
    request: web.BaseRequest, upstream: ClientResponse, response: web.StreamResponse, why: str
) -> web.StreamResponse:
    """Too late for a 502: the status line is out. The connection is cut so the client
    sees a truncated response."""
    log.warning("upstream response broke off: %s", why)
    upstream.close()
    response.force_close()
    if request.transport is not None:
        request.transport.close()
    return response


def _upstream_failure(exc: BaseException, route: Route) -> UpstreamTimeout | UpstreamUnavailable:
    """What an upstream fault becomes: a 504 when it was too slow, else a 502."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"upstream did not answer within {route.config.timeout:g}s")
    # Refused, reset, or an answer that is not HTTP: the upstream failed.
    return UpstreamUnavailable(f"upstream unavailable ({type(exc).__name__})")


class _TooLarge(Exception):
    """Raised inside the streamed request body to stop it: past `max_body_size`, or broken."""


class _BodyState:
    """What the streamed request body tells `forward` while it is being sent."""

    __slots__ = (
        "client_failed",
        "deadlines",
        "expects_continue",
        "seconds",
        "task",
        "too_large",
    )

    def __init__(self, deadlines: Deadlines, task: asyncio.Task[object], seconds: float) -> None:
        self.deadlines = deadlines
        self.task = task  # the request's, whose deadline the body's progress restarts
        self.seconds = seconds
        self.too_large = False  # passed `max_body_size`
        self.client_failed = False  # the client's body was malformed or cut off
        self.expects_continue = False  # the client waits for 100 Continue to send its body

    def progress(self) -> None:
        # The route timeout is the upstream's time to answer: while the client
        # is still sending, it restarts with every chunk, so a slow upload is
        # not a slow upstream, yet a stalled one is still cut off.
        self.deadlines.restart(self.task, self.seconds)
