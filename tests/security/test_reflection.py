"""Item 7: CR, LF, NUL (and the Unicode line breaks) in anything the gateway reflects
(error details, the request id, tower metadata copied into claims) never split a
response or a log line."""

from __future__ import annotations

import json
import logging
import re

import jwt
import pytest

from tests.conftest import JWT_SECRET, GatewayFactory, Harness, tower_record
from tests.security.conftest import GOOD, RecordingLog, add_keys, exchange, request_bytes

BREAKS = ["\r", "\n", "\r\n", "\x00", "\x85", "\u2028", "\u2029", "\x1b[31m", "\x0b", "\x0c"]


def assert_single_lines(caplog: pytest.LogCaptureFixture, log: RecordingLog) -> None:
    """Every log message is one line of printable text; every access line is one line."""
    for record in caplog.records:
        message = record.getMessage()
        assert message.isprintable(), repr(message)
    for text in log.text:
        assert "\n" not in text and "\r" not in text and text.isascii(), text


def assert_one_clean_response(raw: bytes) -> None:
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert len(re.findall(rb"(?:^|\n)HTTP/1\.[01] \d{3} ", raw)) == 1, raw
    for line in head.split(b"\r\n")[1:]:
        name = line.split(b":", 1)[0].lower()
        assert name not in (b"set-cookie", b"injected", b"location"), raw
        assert all(32 <= c < 127 or c == 9 for c in line), line


@pytest.fixture
async def rgw(make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture) -> Harness:
    caplog.set_level(logging.DEBUG)
    h = await make_gateway(
        access_log=RecordingLog(),
        routes=[{"path": "/api", "upstream": "http://127.0.0.1:9"}],
    )
    add_keys(h.tower)
    return h


@pytest.mark.parametrize(
    "target",
    [
        "/nothing%0d%0aSet-Cookie:%20x=1",
        "/nothing%0aInjected:%201",
        "/nothing%e2%80%a8x",
        "/nothing%c2%85x",
        '/nothing"},{"error":"forged',
        "/nothing%22%7D%2C%7B%22x%22%3A%22",
    ],
)
async def test_a_path_reflected_in_an_error_splits_nothing(
    rgw: Harness, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    assert rgw.client.port is not None
    answer = await exchange(rgw.client.port, request_bytes(target, ("X-API-Key", GOOD)))
    assert answer.status == 404
    assert_one_clean_response(answer.raw)
    body = answer.first.json()
    assert set(body) == {"error", "detail"} and body["error"] == "no_route"
    assert "\r" not in body["detail"] and "\n" not in body["detail"]
    log = rgw.gateway.access_log
    assert isinstance(log, RecordingLog)
    assert len(log.text) == 1
    assert_single_lines(caplog, log)


@pytest.mark.parametrize(
    "value",
    [
        b"abc\rInjected: 1",
        b"abc\r\n Injected: 1",
        b"abc\x00def",
        b"abc%0d%0aInjected:%201",
        "abc\u2028def".encode(),
        b"\xff\xfe",
        b"a" * 129,
        b"",
    ],
)
async def test_a_hostile_request_id_is_replaced_or_refused(
    rgw: Harness, caplog: pytest.LogCaptureFixture, value: bytes
) -> None:
    assert rgw.client.port is not None
    raw = b"GET /nothing HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nX-Request-Id: " + value
    answer = await exchange(rgw.client.port, raw + b"\r\n\r\n")
    assert answer.status in (400, 404), answer.raw
    assert_one_clean_response(answer.raw)
    rid = answer.first.header("X-Request-Id")
    assert rid is not None and rid.encode() != value
    assert len(rid) == 32 and rid.isalnum()
    log = rgw.gateway.access_log
    assert isinstance(log, RecordingLog)
    assert_single_lines(caplog, log)


@pytest.mark.parametrize("brk", BREAKS)
@pytest.mark.parametrize("field", ["team", "role", "scope", "user_id", "key_id"])
async def test_tower_metadata_with_line_breaks_is_a_fault_never_a_claim(
    rgw: Harness, caplog: pytest.LogCaptureFixture, field: str, brk: str
) -> None:
    record = tower_record("k9", "u9", "operator", ["tools:execute"], team="blue")
    value = f"evil{brk}X-Injected: 1"
    if field == "team":
        record["metadata"]["team"] = value
    elif field == "scope":
        record["scopes"] = ["tools:execute", value]
    else:
        record[field] = value
    rgw.tower.keys["hostile-key-1"] = record
    response = await rgw.client.get("/api/x", headers={"X-API-Key": "hostile-key-1"})
    assert response.status == 503
    assert (await response.json())["error"] == "tower_unavailable"
    assert "X-Injected" not in response.headers
    log = rgw.gateway.access_log
    assert isinstance(log, RecordingLog)
    assert_single_lines(caplog, log)
    assert not any(value in r.getMessage() for r in caplog.records)


async def test_printable_unicode_metadata_reaches_the_jwt_intact(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    h = await make_gateway(access_log=RecordingLog())
    team = 'équipe "bleue" \\ 東京'
    h.tower.keys["unicode-key-1"] = tower_record(
        "k8", "ü8", "operator", ["tools:ex\u00e9cute"], team=team
    )
    response = await h.client.get("/x", headers={"X-API-Key": "unicode-key-1"})
    assert response.status == 200
    auth = h.upstream.seen[-1].header("authorization")
    assert auth is not None
    claims = jwt.decode(auth.split()[1], JWT_SECRET, algorithms=["HS256"], audience="internal")
    assert (claims["team"], claims["sub"], claims["scopes"]) == (team, "ü8", ["tools:ex\u00e9cute"])
    log = h.gateway.access_log
    assert isinstance(log, RecordingLog)
    assert_single_lines(caplog, log)
    assert json.loads(log.text[0])["user"] == "ü8"
