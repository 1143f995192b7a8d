"""The proxy listener's HTTP/1 server: aiohttp's, answering what it cannot parse in the
gateway's own shape.

aiohttp answers a request its parser refuses (a smuggling attempt, a bare CR, an
over-long line) itself, with a plain-text 400 that quotes the offending bytes;
those bytes may hold the client's key. Here such a request gets the gateway's
JSON error body, a fixed detail that echoes nothing, and a fresh `X-Request-Id`,
and the connection is closed. A body that breaks its framing after its head was
handed out fails its request at once (`GatewayRequestHandler.data_received`).
aiohttp has no supported switch for the handler class, so `GatewayRunner` builds
its `web.Server` as a `GatewayServer`, whose connections are
`GatewayRequestHandler`s. An app that names its handler under `ANSWER` gets
every request that parsed handed straight to it, as a plain `BaseRequest`: no
router (which could not place a CONNECT's authority-form target, nor a path
whose %0A decodes to a newline) and no middleware chain, a few microseconds
per request less.

Every listener the gateway opens is served by a `GatewayRunner`, and so bounds
how long a connection may stay without a request (`Timeouts`, from
`server.header_timeout` and `server.keepalive_timeout`, set on the app under
`TIMEOUTS`): a fresh connection, and one that starts a request after an idle
keep-alive spell, must deliver the request's whole head within
`header_timeout` seconds; an idle keep-alive connection is closed after
`keepalive_timeout` (aiohttp's own timer, whose default is an hour). Both
close the connection without an answer, as nginx does.

Pipelined requests are answered in order. Both of aiohttp's parsers refuse
bytes that follow a request which ends the connection (`Connection: close`,
or HTTP/1.0 without keep-alive), and in doing so drop every request parsed
from the same read, answering only a 400; so while no body is being read,
the bytes of a read are handed to the parser one request head at a time, and
nothing is read after such a request (RFC 9112 9.6): it is answered and the
connection closed.

Responses say `Server: tower-gateway`, never aiohttp's and Python's versions.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Final, Protocol, runtime_checkable

from aiohttp import hdrs, web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.http_parser import HttpRequestParser, HttpRequestParserPy
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from gateway.config import ServerConfig
from gateway.http import aiohttp_private as private
from gateway.http.answers import json_error
from gateway.http.headers import NOSNIFF, REQUEST_ID

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# The one handler that answers every request on an app; `GatewayRunner` hands requests
# to it straight, past aiohttp's router and middleware chain.
ANSWER: Final = web.AppKey[Handler]("answer")
# The `Server` of every response that has none, instead of aiohttp's and Python's
# versions: set once, here, rather than a header on every response.
SERVER_NAME: Final = "tower-gateway"
private.set_server_software(SERVER_NAME)
HEAD_END: Final = b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long a listener waits for a request's head, and on an idle keep-alive."""

    header: float = 10.0
    keepalive: float = 75.0

    @classmethod
    def of(cls, server: ServerConfig) -> Timeouts:
        return cls(server.header_timeout, server.keepalive_timeout)


# An app's listener timeouts; a `GatewayRunner` serving an app without them uses the
# defaults, never aiohttp's hour.
TIMEOUTS: Final = web.AppKey("timeouts", Timeouts)


def listener_app(app: web.Application, server: ServerConfig) -> web.Application:
    """An app served as a gateway listener (ops, the supervisor's ops): its config's
    timeouts, and `X-Content-Type-Options: nosniff` on all it answers."""
    app[TIMEOUTS] = Timeouts.of(server)
    app.on_response_prepare.append(_nosniff)
    return app


async def _nosniff(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault(*NOSNIFF)

# Fixed texts per parser error: what went wrong, never the bytes it went wrong on.
_DETAILS: Final[tuple[tuple[type[HttpProcessingError], str], ...]] = (
    (LineTooLong, "a request line or header field is too long"),
    (BadHttpMethod, "the request method is not a valid token"),
    (BadStatusLine, "the request line is not valid HTTP/1.1"),
    (InvalidHeader, "a header field is not valid"),
    (TransferEncodingError, "the chunked body is malformed"),
    (ContentLengthError, "the body does not match its Content-Length"),
)
MALFORMED_DETAIL: Final = "the request is not valid HTTP/1.1"
# No real chunk is this large (4 EiB); llhttp refuses sizes past 64 bits, and
# this keeps the pure-Python parser in line with it.
MAX_CHUNK_SIZE: Final = 2**62
CHUNK_OVERFLOW_DETAIL: Final = "a chunk size is beyond any real body"
# aiohttp's parser for this process: llhttp, or its own pure-Python one
# (`AIOHTTP_NO_EXTENSIONS=1`, or no C extension for the platform).
PURE_PYTHON_PARSER: Final = HttpRequestParser is HttpRequestParserPy


def describe(exc: BaseException | None) -> str:
    """The fixed detail for a parser error; never any part of the request."""
    for kind, text in _DETAILS:
        if isinstance(exc, kind):
            return text
    return MALFORMED_DETAIL


class GatewayRequestHandler(RequestHandler):
    """One client connection; errors aiohttp answers itself get the gateway's JSON body."""

    def __init__(self, *args: Any, header_timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        # The body of the newest request parsed: while it is unfinished, what
        # arrives is body; once it is complete, the start of another head.
        self._last_body: StreamReader | None = None
        self._last_message: object = None
        # A request that ends the connection was parsed: nothing after it is read.
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            loop = private.handler_loop(self)
            self._head_timer = loop.call_later(self._header_timeout, self._head_overdue)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        self.logger.info("closing a connection whose request head took too long")
        if private.idle(self):
            self.force_close()  # nothing in progress: no answer is owed
        else:
            self.close()  # after the request in progress is answered

    def data_received(self, data: bytes) -> None:
        if not data:
            # aiohttp's nudge to parse what it held back while its queue was full.
            self._feed(data)
            return
        while data and not private.closing(self):
            if private.upgraded(self):
                self._feed(data)
                return
            if self._unfinished_body():
                # A body as it comes; when its length is known, up to its end only.
                left = self._body_left()
                if left is None or left >= len(data):
                    self._feed(data)
                    return
                self._feed(data[:left])
                data = data[left:]
                continue
            if self._closing:
                return  # nothing after a request that closes the connection (RFC 9112 9.6)
            # A head is due: one request head at a time, so a request that closes the
            # connection does not take the ones before it in the same read down with it.
            end = data.find(HEAD_END)
            if end < 0 or end + len(HEAD_END) == len(data):
                self._feed(data)
                return
            end += len(HEAD_END)
            self._feed(data[:end])
            data = data[end:]

    def _body_left(self) -> int | None:
        """The bytes still due of the newest request's body, when it has a length."""
        message, body = self._last_message, self._last_body
        if message is None or body is None or getattr(message, "chunked", True):
            return None
        length = getattr(message, "headers", {}).get(hdrs.CONTENT_LENGTH)
        if length is None or not length.isdigit():
            return None
        left = int(length) - body.total_bytes
        return left if left > 0 else None

    def _unfinished_body(self) -> bool:
        body = self._last_body
        return body is not None and not body.is_eof()

    def _feed(self, data: bytes) -> None:
        """aiohttp's parsing of `data`, then the gateway's checks of what it parsed."""
        messages = private.queued_messages(self)
        queued = len(messages)
        super().data_received(data)
        added = len(messages) - queued
        if self._closing:
            # What follows a request that closes the connection (more requests, or
            # the parse error of those bytes) is never answered; a broken body of
            # that request itself still fails it.
            broken = _framing_error(messages) if added else None
            for _ in range(added):
                messages.pop()
            if broken is not None and self._unfinished_body():
                self._fail_bodies(broken, None)
            return
        if added:
            self._last_message, self._last_body = messages[-1]
            self._cancel_head_timer()
            self._closing = (
                getattr(messages[-1][0], "should_close", False)
                if added == 1
                else any(
                    getattr(m, "should_close", False) for m, _ in islice(messages, queued, None)
                )
            )
        elif data and not private.upgraded(self) and not self._unfinished_body():
            self._arm_head_timer()  # the start of a head, after an idle spell
        if private.closing(self):
            return
        broken = _framing_error(messages)
        overflowing = _overflowing_body(self) if PURE_PYTHON_PARSER else None
        if broken is not None or overflowing is not None:
            self._fail_bodies(broken, overflowing)

    def _fail_bodies(
        self, broken: HttpProcessingError | None, overflowing: _Failable | None
    ) -> None:
        # aiohttp's C parser, failing in the middle of a body whose head it has
        # already handed out, drops that body without a word: its reader would
        # wait until a timeout, then the 400 would follow. And its pure-Python
        # parser takes any chunk size, so bytes a 64-bit parser in front would
        # read as the next request become this request's body. Either way the
        # body is failed now, so its request ends in a 400, and nothing more is
        # read from this connection.
        error = RequestPayloadError(describe(broken) if broken else CHUNK_OVERFLOW_DETAIL)
        for payload in self._unfinished_bodies():
            payload.set_exception(error)
        if overflowing is not None:
            overflowing.set_exception(error)
        self.close()

    def _unfinished_bodies(self) -> list[StreamReader]:
        """The bodies of the request being handled and of those queued behind it."""
        payloads: list[StreamReader] = []
        current = private.current_body(self)
        if current is not None:
            payloads.append(current)
        payloads.extend(p for _, p in private.queued_messages(self) if isinstance(p, StreamReader))
        return [p for p in payloads if not p.is_eof() and p.exception() is None]

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        rid = uuid.uuid4().hex
        if isinstance(exc, HttpProcessingError):
            # The exception's text quotes the request; the name of its class does not.
            self.logger.info(
                "malformed HTTP request from %s (%s), request id %s",
                request.remote,
                type(exc).__name__,
                rid,
            )
        else:
            self.log_exception(
                "error handling request %s from %s", rid, request.remote, exc_info=exc
            )
        if request.writer.output_size > 0:
            # Part of a response is out: too late for another one.
            raise ConnectionError("response already started; cannot send an error response")
        if status < 500:
            response = json_error(status, "malformed_request", describe(exc))
        elif status == 504:
            response = json_error(status, "timeout", "the request took too long")
        else:
            response = json_error(status, "internal_error", "internal error")
        response.headers[REQUEST_ID] = rid
        response.headers[NOSNIFF[0]] = NOSNIFF[1]
        response.force_close()
        return response


def _framing_error(messages: Sequence[tuple[object, object]]) -> HttpProcessingError | None:
    """The parser error queued as the newest message, if any (aiohttp's `_ErrInfo`)."""
    exc = getattr(messages[-1][0], "exc", None) if messages else None
    return exc if isinstance(exc, HttpProcessingError) else None


def _overflowing_body(handler: RequestHandler) -> _Failable | None:
    """The body being read, when the pure-Python parser took a chunk size beyond
    MAX_CHUNK_SIZE for it.

    Reads that parser's own state (the bytes still due in the current chunk); the
    C parser keeps it out of reach and refuses sizes past 64 bits itself.
    """
    due, body = private.chunk_in_progress(handler)
    if due <= MAX_CHUNK_SIZE:
        return None
    return body if isinstance(body, _Failable) else None


@runtime_checkable
class _Failable(Protocol):
    def set_exception(self, exc: BaseException) -> None: ...


class GatewayServer(web.Server):
    """aiohttp's low-level server, with `GatewayRequestHandler` connections."""

    header_timeout: float = 10.0

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(
            self,
            loop=private.server_loop(self),
            header_timeout=self.header_timeout,
            **private.server_kwargs(self),
        )


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose server is a `GatewayServer`; a drop-in for the proxy app."""

    async def _make_server(self) -> web.Server:  # aiohttp_private.PINNED
        server = await super()._make_server()
        # The application built a plain `web.Server` with every keyword its
        # `handler_args` and this runner supply; the same again, as a GatewayServer.
        answer = self.app.get(ANSWER)
        timeouts = self.app.get(TIMEOUTS) or Timeouts()
        kwargs = {**private.server_kwargs(server), "keepalive_timeout": timeouts.keepalive}
        gateway_server = GatewayServer(
            answer or server.request_handler,
            # The gateway's handler needs no router state: plain `BaseRequest`s.
            request_factory=None if answer else server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=private.server_loop(server),
            **kwargs,
        )
        gateway_server.header_timeout = timeouts.header
        return gateway_server
