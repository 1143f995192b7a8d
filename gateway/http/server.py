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
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol, runtime_checkable

from aiohttp import web
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

from gateway.http import aiohttp_private as private
from gateway.http.answers import json_error
from gateway.http.headers import REQUEST_ID

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# The one handler that answers every request on an app; `GatewayRunner` hands requests
# to it straight, past aiohttp's router and middleware chain.
ANSWER: Final = web.AppKey[Handler]("answer")

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

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if private.closing(self):
            return
        broken = _framing_error(private.queued_messages(self))
        overflowing = _overflowing_body(self) if PURE_PYTHON_PARSER else None
        if broken is None and overflowing is None:
            return
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

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(
            self, loop=private.server_loop(self), **private.server_kwargs(self)
        )


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose server is a `GatewayServer`; a drop-in for the proxy app."""

    async def _make_server(self) -> web.Server:  # aiohttp_private.PINNED
        server = await super()._make_server()
        # The application built a plain `web.Server` with every keyword its
        # `handler_args` and this runner supply; the same again, as a GatewayServer.
        answer = self.app.get(ANSWER)
        return GatewayServer(
            answer or server.request_handler,
            # The gateway's handler needs no router state: plain `BaseRequest`s.
            request_factory=None if answer else server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=private.server_loop(server),
            **private.server_kwargs(server),
        )
