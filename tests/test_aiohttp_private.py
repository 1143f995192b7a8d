"""The private aiohttp names the proxy listener relies on (`gateway.http.aiohttp_private`) still
exist in the installed aiohttp. When an upgrade renames one, this fails and names it."""

from __future__ import annotations

import asyncio

from aiohttp import web, web_response
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpPayloadParser, HttpRequestParserPy
from aiohttp.web_protocol import RequestHandler

from gateway.http import aiohttp_private as private

CHUNKED = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"


async def _ok(_request: web.BaseRequest) -> web.StreamResponse:
    return web.Response()


async def live_objects() -> dict[str, object]:
    """One instance of every class PINNED names, in the state the gateway reads it in."""
    loop = asyncio.get_running_loop()
    server = web.Server(_ok, max_field_size=1234)
    handler = RequestHandler(server, loop=loop)
    parser = HttpRequestParserPy(BaseProtocol(loop), loop, 2**16)
    parser.feed_data(CHUNKED)
    payload_parser = parser._payload_parser
    assert isinstance(payload_parser, HttpPayloadParser)
    return {
        "RequestHandler": handler,
        "HttpRequestParserPy": parser,
        "HttpPayloadParser": payload_parser,
        "Server": server,
        "AppRunner": web.AppRunner(web.Application()),
        "web_response": web_response,
    }


async def test_every_pinned_private_name_exists() -> None:
    objects = await live_objects()
    missing = [
        f"{owner}.{name}"
        for owner, name in private.PINNED
        if not (
            hasattr(objects[owner], name) or name in getattr(type(objects[owner]), "__slots__", ())
        )
    ]
    assert missing == [], f"aiohttp no longer has {missing}: update gateway.http.aiohttp_private"


async def test_the_adapter_reads_what_it_says() -> None:
    objects = await live_objects()
    server = objects["Server"]
    assert isinstance(server, web.Server)
    assert private.server_kwargs(server) == {"max_field_size": 1234}
    assert private.server_loop(server) is asyncio.get_running_loop()
    handler = objects["RequestHandler"]
    assert isinstance(handler, RequestHandler)
    assert private.closing(handler) is False
    assert private.upgraded(handler) is False and private.idle(handler) is False
    assert private.handler_loop(handler) is asyncio.get_running_loop()
    assert list(private.queued_messages(handler)) == []
    assert private.current_body(handler) is None
    # The pure-Python parser in the middle of a 5-byte chunk of which 2 arrived: 3 due.
    handler._parser = objects["HttpRequestParserPy"]  # type: ignore[assignment]
    due, body = private.chunk_in_progress(handler)
    assert due == 3 and body is not None
