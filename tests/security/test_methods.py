"""Item 5: methods. TRACE, TRACK and CONNECT are refused with 405 on every route (never
forwarded, not even on a public one); a method that is not an upper-case token of at
most 32 characters is refused with 400; every other method, registered or not, gets
exactly the authentication any method gets. Run against both HTTP parsers."""

from __future__ import annotations

import pytest

from tests.conftest import Harness
from tests.security.conftest import GOOD, Exchange, GatewayProcess, exchange, request_bytes

REFUSED = ["TRACE", "TRACK", "CONNECT"]
# Methods every parser accepts; each needs a key like GET does.
ORDINARY = [
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "PATCH",
    "DELETE",
    "OPTIONS",
    "PROPFIND",
    "MKCOL",
    "PURGE",
]


@pytest.mark.parametrize("method", REFUSED)
@pytest.mark.parametrize("path", ["/x", "/public/x"])
async def test_trace_track_and_connect_are_405_everywhere(
    gproc: GatewayProcess, method: str, path: str
) -> None:
    answer = await exchange(
        gproc.port,
        request_bytes(path, ("X-API-Key", GOOD), method=method),
        first_reply=gproc.parser == "python",
    )
    if gproc.parser == "c" and method == "TRACK":
        # llhttp does not know TRACK: refused by the parser, as any unknown method.
        assert answer.status == 400
    else:
        assert answer.status == 405, answer.raw
        assert answer.first.json()["error"] == "method_not_allowed"
        assert "TRACE" not in (answer.first.header("Allow") or "")
    assert_closing(gproc, answer)
    assert gproc.upstream.seen == []
    assert gproc.tower.calls == []


def assert_closing(gproc: GatewayProcess, answer: Exchange) -> None:
    """The gateway ends the connection: at once with llhttp; the pure-Python parser
    reads a CONNECT's tunnel bytes (to discard them) for aiohttp's lingering time
    first, so there the `Connection: close` it was told is what is checked."""
    if gproc.parser == "c":
        assert answer.closed
    else:
        assert answer.first.header("Connection") == "close"


async def test_connect_in_authority_form_is_refused(gproc: GatewayProcess) -> None:
    raw = (
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"
        b"GET /admin HTTP/1.1\r\nHost: gw\r\n\r\n"
    )
    answer = await exchange(gproc.port, raw, first_reply=gproc.parser == "python")
    assert [r.status for r in answer.replies] == [405]
    assert_closing(gproc, answer)
    assert gproc.upstream.seen == []
    assert gproc.tower.calls == []


@pytest.mark.parametrize("method", ORDINARY)
async def test_every_method_needs_a_key_on_an_auth_route(
    gproc: GatewayProcess, method: str
) -> None:
    answer = await exchange(gproc.port, request_bytes("/admin/x", method=method))
    assert answer.status == 401, answer.raw
    answer = await exchange(
        gproc.port, request_bytes("/admin/x", ("X-API-Key", GOOD), method=method)
    )
    assert answer.status == 403
    assert gproc.upstream.seen == []
    answer = await exchange(gproc.port, request_bytes("/x", ("X-API-Key", GOOD), method=method))
    assert answer.status == 200
    assert [s.method for s in gproc.upstream.seen] == [method]


@pytest.mark.parametrize(
    "method",
    ["get", "Get", "gEt", "FOO", "M-SEARCH", "X" * 32, "X" * 33, "A" * 200, "GET\x7f", "G_T"],
)
async def test_odd_methods_are_refused_or_authenticated_never_forwarded_without_a_key(
    gproc: GatewayProcess, method: str
) -> None:
    answer = await exchange(gproc.port, request_bytes("/x", method=method))
    # llhttp refuses names it does not know (400); the pure-Python parser takes any
    # token (upper-casing it), and then the gateway either refuses the name (400)
    # or asks for a key like for any other method (401).
    assert answer.status in (400, 401), answer.raw
    assert answer.first.json()["error"] in {"malformed_request", "bad_method", "missing_key"}
    if len(method) > 32:
        assert answer.status == 400
    assert method not in answer.first.body.decode("latin-1") or method.upper() == "GET"
    assert gproc.upstream.seen == []
    assert gproc.tower.calls == []


async def test_an_unknown_method_with_a_key_is_forwarded_as_sent_on_a_capable_parser(
    gproc: GatewayProcess,
) -> None:
    answer = await exchange(gproc.port, request_bytes("/x", ("X-API-Key", GOOD), method="FOO"))
    if gproc.parser == "c":
        assert answer.status == 400  # llhttp refuses it before the gateway sees it
        assert gproc.upstream.seen == []
    else:
        # Authenticated like any method, then forwarded as sent (this test upstream
        # runs llhttp, so it is the upstream that refuses FOO).
        assert answer.first.body.startswith(b"Invalid method")


async def test_trace_is_refused_in_process_too(gw: Harness) -> None:
    response = await gw.client.request("TRACE", "/public/x")
    assert response.status == 405
    assert response.headers["Allow"]
    assert (await response.json())["error"] == "method_not_allowed"
    assert response.headers["X-Request-Id"]
    assert gw.upstream.seen == []
