"""Item 10: a key in the URL is refused (400 `key_in_query`) in every spelling, on every
route, before anything else; neither the query nor the key ever appears in a log line.

There is deliberately no opt-in to accept keys in the query: URLs end up in browser
histories, proxy logs and Referer headers. Browsers, which cannot set headers on a
WebSocket, send the key in the first message instead.
"""

from __future__ import annotations

import logging

import pytest

from tests.conftest import Harness
from tests.security.conftest import (
    GOOD,
    GatewayProcess,
    RecordingLog,
    exchange,
    request_bytes,
)

SECRET = "query-key-SECRET-4242"
QUERIES = [
    f"api_key={SECRET}",
    f"API_KEY={SECRET}",
    f"api%5Fkey={SECRET}",
    f"api%5fkey={SECRET}",
    f"%61pi_key={SECRET}",
    f"apikey={SECRET}",
    f"ApiKey={SECRET}",
    f"api-key={SECRET}",
    f"api.key={SECRET}",
    f"api+key={SECRET}",
    f"x-api-key={SECRET}",
    f"X_API_KEY={SECRET}",
    f"a=1&api_key={SECRET}",
    f"a=1;api_key={SECRET}",
    f"api_key[]={SECRET}",
    "api_key",
    "api_key=",
]


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("path", ["/x", "/public/x", "/nowhere"])
async def test_a_key_in_the_query_is_refused_in_every_spelling(
    make_gateway_with_log: Harness, caplog: pytest.LogCaptureFixture, query: str, path: str
) -> None:
    h = make_gateway_with_log
    assert h.client.port is not None
    answer = await exchange(h.client.port, request_bytes(f"{path}?{query}", ("X-API-Key", GOOD)))
    assert answer.status == 400, answer.raw
    assert answer.first.json()["error"] == "key_in_query"
    assert SECRET not in answer.raw.decode("latin-1")
    assert h.tower.calls == []
    assert h.upstream.seen == []
    assert_logs_clean(h, caplog)


async def test_a_websocket_upgrade_with_a_query_key_is_refused(
    make_gateway_with_log: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h = make_gateway_with_log
    response = await h.client.get(
        f"/chat?api_key={SECRET}",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        },
    )
    assert response.status == 400
    assert_logs_clean(h, caplog)


@pytest.mark.parametrize("query", ["apikeys=1", "keyword=apikey", "q=api_key", "api=key", "page=2"])
async def test_other_parameters_are_left_alone(gw: Harness, query: str) -> None:
    response = await gw.client.get(f"/x?{query}", headers={"X-API-Key": GOOD})
    assert response.status == 200
    assert gw.upstream.seen[-1].path == f"/x?{query}"


async def test_no_log_line_of_a_real_process_holds_the_query(gproc: GatewayProcess) -> None:
    refusals = gproc.logs().count('"reason": "key_in_query"')
    malformed = gproc.logs().count("malformed HTTP request")
    for query in QUERIES:
        answer = await exchange(gproc.port, request_bytes(f"/x?{query}", ("X-API-Key", GOOD)))
        assert answer.status == 400
    # A parse failure on the same line must not leak it either.
    await exchange(gproc.port, f"GET /x?api_key={SECRET}\x01 HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    # Every refusal was logged, and the parse failure ...
    await gproc.logs_with('"reason": "key_in_query"', refusals + len(QUERIES))
    logs = await gproc.logs_with("malformed HTTP request", malformed + 1)
    assert SECRET not in logs  # ... without the key
    assert "api_key" not in logs.lower().replace("key_in_query", "")


@pytest.fixture
async def make_gateway_with_log(gw: Harness, caplog: pytest.LogCaptureFixture) -> Harness:
    caplog.set_level(logging.DEBUG)
    gw.gateway.access_log = RecordingLog()
    return gw


def assert_logs_clean(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    log = h.gateway.access_log
    assert isinstance(log, RecordingLog)
    assert log.lines, "the refusal was logged"
    texts = log.text + [r.getMessage() for r in caplog.records]
    texts += [r.exc_text or "" for r in caplog.records]
    for text in texts:
        assert SECRET not in text
        assert "api_key" not in text.lower() and "apikey" not in text.lower(), text
