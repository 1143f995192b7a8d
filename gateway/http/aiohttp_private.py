"""Everything `gateway.http.server` reads of aiohttp that aiohttp does not promise to keep.

aiohttp has no supported way to choose the server's connection class, nor to
see a request's parser state, so the proxy listener leans on a few private
names. They all go through this module, and `tests/test_aiohttp_private.py`
checks each against the installed aiohttp: an upgrade that renames one fails
that test by name instead of quietly turning a check off.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web, web_response
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

# (owner, attribute): what is read or overridden, for the test that pins them.
PINNED: Final = (
    ("RequestHandler", "_messages"),  # the queue of parsed (message, payload) pairs
    ("RequestHandler", "_current_request"),  # the request being handled
    ("RequestHandler", "_close"),  # closing after this request
    ("RequestHandler", "_force_close"),  # closing now
    ("RequestHandler", "_parser"),  # the connection's HTTP parser
    ("RequestHandler", "_upgraded"),  # the connection is a WebSocket now
    ("RequestHandler", "_waiter"),  # set while the connection waits for a request
    ("RequestHandler", "_loop"),
    ("HttpRequestParserPy", "_payload_parser"),  # the body parser of the pure-Python one
    ("HttpPayloadParser", "_chunk_size"),  # bytes still due in the current chunk
    ("HttpPayloadParser", "payload"),  # the body being read
    ("Server", "_kwargs"),  # the keywords a Server passes to each RequestHandler
    ("Server", "_loop"),
    ("AppRunner", "_make_server"),  # the hook that builds a runner's Server
    ("web_response", "SERVER_SOFTWARE"),  # the default `Server` header
)


def closing(handler: RequestHandler) -> bool:
    """Whether the connection is closing already (after this request, or at once)."""
    return bool(handler._close or handler._force_close)


def upgraded(handler: RequestHandler) -> bool:
    return bool(handler._upgraded)


def idle(handler: RequestHandler) -> bool:
    """Whether the connection is waiting for a request (none is in progress)."""
    waiter = handler._waiter
    return waiter is not None and not waiter.done()


def handler_loop(handler: RequestHandler) -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop = handler._loop
    return loop


def queued_messages(handler: RequestHandler) -> deque[tuple[Any, Any]]:
    """The parsed requests not handled yet, as (message, payload) pairs; the caller may
    drop the newest ones."""
    messages: deque[tuple[Any, Any]] = handler._messages
    return messages


def current_body(handler: RequestHandler) -> StreamReader | None:
    request = handler._current_request
    return request.content if request is not None else None


def chunk_in_progress(handler: RequestHandler) -> tuple[int, object]:
    """(bytes still due in the chunk being read, that body), from the pure-Python parser;
    (0, None) where the state is out of reach (the C parser)."""
    payload_parser = getattr(getattr(handler, "_parser", None), "_payload_parser", None)
    due = getattr(payload_parser, "_chunk_size", 0)
    body = getattr(payload_parser, "payload", None)
    return (due if isinstance(due, int) else 0), body


def server_kwargs(server: web.Server) -> Mapping[str, Any]:
    """The keywords `server` hands each connection (`handler_args`, the runner's own)."""
    kwargs: Mapping[str, Any] = server._kwargs
    return kwargs


def server_loop(server: web.Server) -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop = server._loop
    return loop


def set_server_software(name: str) -> None:
    """The `Server` header aiohttp writes on every response that has none."""
    web_response.SERVER_SOFTWARE = name  # type: ignore[attr-defined]
