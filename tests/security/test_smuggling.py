"""Request smuggling over raw sockets, against both of aiohttp's HTTP parsers.

Every request of the corpus is one whose framing two HTTP implementations could
read differently. The gateway must answer it with 400, close the connection and
forward nothing: not the request, and above all not a second request hidden in
its body. Each case runs against a gateway process using aiohttp's C parser
(llhttp) and one using its pure-Python parser (`AIOHTTP_NO_EXTENSIONS=1`).
"""

from __future__ import annotations

import json

import pytest

from tests.security.conftest import (
    GOOD,
    GatewayProcess,
    exchange,
    request_bytes,
    rss_bytes,
)

HEAD = b"POST /x HTTP/1.1\r\nHost: gw\r\nX-API-Key: " + GOOD.encode() + b"\r\n"
# What a smuggler hides behind the first request: an unauthenticated admin call.
SMUGGLED = b"GET /admin/secret HTTP/1.1\r\nHost: gw\r\n\r\n"

CORPUS: dict[str, bytes] = {
    "cl_and_te": HEAD
    + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "te_and_cl": HEAD
    + b"Transfer-Encoding: chunked\r\nContent-Length: 48\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "duplicate_content_length": HEAD
    + b"Content-Length: 0\r\nContent-Length: 41\r\n\r\n"
    + SMUGGLED,
    "duplicate_equal_content_length": HEAD
    + b"Content-Length: 41\r\nContent-Length: 41\r\n\r\n"
    + SMUGGLED,
    "content_length_list": HEAD + b"Content-Length: 0, 41\r\n\r\n" + SMUGGLED,
    "content_length_plus": HEAD + b"Content-Length: +41\r\n\r\n" + SMUGGLED,
    "xchunked": HEAD + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "chunked_identity": HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "duplicate_transfer_encoding": HEAD
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "te_space_before_colon": HEAD + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "lf_in_chunk_extension": HEAD
    + b"Transfer-Encoding: chunked\r\n\r\n2;ext\nxx\r\n0\r\n\r\n"
    + SMUGGLED,
    "lf_only_chunk_lines": HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\nxx\n0\n\n" + SMUGGLED,
    "bare_cr_in_header_value": HEAD + b"X-Note: a\rb\r\n\r\n" + SMUGGLED,
    "bare_lf_header_line": HEAD + b"X-Note: a\nTransfer-Encoding: chunked\r\n\r\n" + SMUGGLED,
    "nul_in_header_value": HEAD + b"X-Note: a\x00b\r\n\r\n" + SMUGGLED,
    "obs_fold_continuation": HEAD
    + b"Transfer-Encoding: identity\r\n chunked\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "obs_fold_key_header": b"GET /x HTTP/1.1\r\nHost: gw\r\nX-API-Key: "
    + GOOD.encode()
    + b"\r\n evil\r\n\r\n",
    "chunk_size_overflow_64bit": HEAD
    + b"Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\n"
    + SMUGGLED,
    "chunk_size_far_too_large": HEAD
    + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFFFFFF\r\n"
    + SMUGGLED,
    "chunk_size_not_hex": HEAD + b"Transfer-Encoding: chunked\r\n\r\n0x2\r\nxx\r\n0\r\n\r\n",
    "many_trailers": HEAD
    + b"Transfer-Encoding: chunked\r\n\r\n0\r\n"
    + b"".join(b"T-%d: v\r\n" % i for i in range(300))
    + b"\r\n",
    "transfer_encoding_in_http10": b"POST /x HTTP/1.0\r\nHost: gw\r\nX-API-Key: "
    + GOOD.encode()
    + b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "http09_request": b"GET /x\r\n\r\n",
    "duplicate_host": b"GET /x HTTP/1.1\r\nHost: gw\r\nHost: evil\r\nX-API-Key: "
    + GOOD.encode()
    + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(CORPUS))
async def test_corpus_is_refused_and_nothing_reaches_the_upstream(
    gproc: GatewayProcess, name: str
) -> None:
    answer = await exchange(gproc.port, CORPUS[name], timeout=5)
    assert answer.closed, f"the connection stayed open: {answer.raw[:300]!r}"
    assert len(answer.replies) == 1, answer.raw
    reply = answer.first
    assert reply.status == 400, answer.raw
    body = reply.json()
    assert body["error"] == "malformed_request", body
    assert GOOD not in answer.raw.decode("latin-1")
    assert reply.header("X-Request-Id")
    assert gproc.upstream.seen == []


async def test_a_smuggled_request_split_across_packets_never_reaches_the_upstream(
    gproc: GatewayProcess,
) -> None:
    # The head arrives alone and is authenticated and forwarded; the body that
    # follows breaks the chunked framing with a request inside it.
    head = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    answer = await exchange(gproc.port, head, b"2;x\nxx\r\n0\r\n\r\n" + SMUGGLED, pause=0.3)
    assert answer.closed
    assert [r.status for r in answer.replies] == [400], answer.raw
    assert all(seen.path != "/admin/secret" for seen in gproc.upstream.seen)
    assert all(seen.body_size == 0 for seen in gproc.upstream.seen)


async def test_many_tiny_chunks_are_one_request_with_exactly_their_bytes(
    gproc: GatewayProcess,
) -> None:
    # Valid framing, however wasteful: forwarded whole, as one request, and the
    # connection stays usable; memory stays bounded (the body is streamed).
    chunks = b"1\r\na\r\n" * 20_000 + b"0\r\n\r\n"
    request = HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks
    before = rss_bytes(gproc.pid)
    answer = await exchange(gproc.port, request, timeout=10)
    assert [r.status for r in answer.replies] == [200]
    ((seen),) = gproc.upstream.seen
    assert (seen.method, seen.path, seen.body_size) == ("POST", "/x", 20_000)
    assert rss_bytes(gproc.pid) - before < 32 * 2**20


async def test_memory_stays_bounded_over_the_whole_corpus(gproc: GatewayProcess) -> None:
    before = rss_bytes(gproc.pid)
    for _ in range(5):
        for request in CORPUS.values():
            answer = await exchange(gproc.port, request, timeout=5)
            assert answer.closed
    assert rss_bytes(gproc.pid) - before < 32 * 2**20
    assert gproc.upstream.seen == []
    assert gproc.alive()


async def test_a_refused_request_echoes_nothing_and_logs_no_key(gproc: GatewayProcess) -> None:
    # aiohttp's own 400 quotes the bad line, which here carries the key.
    bad = b"GET /x HTTP/1.1\r\nHost: gw\r\nX-API-Key: " + GOOD.encode() + b"\x01\r\n\r\n"
    logged = gproc.logs().count("malformed HTTP request")
    answer = await exchange(gproc.port, bad)
    assert answer.status == 400
    assert json.loads(answer.first.body) == {
        "error": "malformed_request",
        "detail": answer.first.json()["detail"],
    }
    assert GOOD not in answer.raw.decode("latin-1")
    assert GOOD not in await gproc.logs_with("malformed HTTP request", logged + 1)
    assert gproc.tower.calls == []


async def test_the_two_processes_really_use_different_parsers(gproc: GatewayProcess) -> None:
    # llhttp knows the registered methods only; the pure-Python parser takes any
    # token, which then gets the same authentication as any other method.
    answer = await exchange(gproc.port, request_bytes("/x", method="FOO"))
    if gproc.parser == "c":
        assert answer.first.json()["error"] == "malformed_request"
    else:
        assert answer.first.json()["error"] == "missing_key"
    assert gproc.upstream.seen == []
