"""No secret leaves the gateway: not in logs, access log, metrics, error bodies or upstream."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import pytest
from aiohttp import ClientResponse
from multidict import CIMultiDict
from yarl import URL

from gateway.ops.accesslog import AccessLog
from tests.conftest import SECRETS, GatewayFactory, Harness

VALID = "sk-live-CLIENTKEY-AAAA1111"
LIMITED = "sk-live-LIMITED-CCCC3333"
INVALID = "sk-live-INVALID-DDDD4444"
DURING_OUTAGE = "sk-live-OUTAGE-EEEE5555"
SPACED = "sk-live-SPACED FFFF6666"
LOOKALIKE = "sk-live-LOOKALIKE-GGGG7777"
CLIENT_KEYS = (
    VALID,
    LIMITED,
    INVALID,
    DURING_OUTAGE,
    SPACED,
    "sk-live-SPACED",
    "FFFF6666",
    LOOKALIKE,
)


class Transcript:
    """Everything a client, an operator or an upstream could ever see."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    async def response(self, response: ClientResponse) -> ClientResponse:
        self.parts.append(f"{response.status} {response.reason}")
        self.parts.extend(f"{k}: {v}" for k, v in response.headers.items())
        self.parts.append(await response.text())
        return response

    def add(self, text: str) -> None:
        self.parts.append(text)

    def leaks(self, secrets: tuple[str, ...]) -> list[tuple[str, str]]:
        found = []
        for part in self.parts:
            for secret in secrets:
                if secret in part:
                    found.append((secret, part[:200]))
        return found


@pytest.fixture
def transcript() -> Transcript:
    return Transcript()


async def drive(h: Harness, t: Transcript) -> None:
    """Every outcome: 200, 400, 401, 403, 404, 429, 503, and the admin API."""
    client = h.client

    async def get(path: str, headers: Any = None, status: int | None = None) -> None:
        response = await t.response(await client.get(path, headers=headers or {}))
        if status is not None:
            assert response.status == status, (path, await response.text())

    await get("/x", {"X-API-Key": VALID}, 200)
    await get("/tools/run?q=1", {"Authorization": f"Bearer {VALID}"}, 200)
    await get("/x", {"Authorization": f"ApiKey {VALID}"}, 200)
    await get("/x", {"X-API-Key": INVALID}, 401)
    await get("/x", {"X-API-Key": INVALID}, 401)  # from the negative cache
    await get("/x", {}, 401)
    await get("/admin/x", {"X-API-Key": VALID}, 403)
    for status in (200, 200, 429):
        await get("/x", {"X-API-Key": LIMITED}, status)
    await get("/x", {"X-API-Key": VALID, "Authorization": f"Bearer {LIMITED}"}, 400)
    await get("/x", CIMultiDict([("X-API-Key", VALID), ("X-API-Key", VALID)]), 400)
    await get("/x", {"X-API-Key": SPACED}, 400)
    await get("/x", {"X-API-Key": "k" * 600}, 400)
    url = URL(str(client.make_url("/x")) + f"?api_key={VALID}", encoded=True)
    await t.response(await client.session.get(url))
    await get("/public/p", {"X_Api_Key": LOOKALIKE, "X-API-Key": VALID}, 200)
    await get("/x", {"X.Api.Key": LOOKALIKE}, 401)

    ops = h.ops
    await t.response(await ops.get("/admin/cache"))
    await t.response(
        await ops.get("/admin/cache", headers={"Authorization": "Bearer wrong-wrong-wrong-1"})
    )
    await t.response(await ops.get("/admin/cache", headers=h.admin_headers()))
    await t.response(await ops.get("/.well-known/jwks.json"))
    await t.response(await ops.get("/readyz"))
    await t.response(await ops.delete("/admin/cache/k1", headers=h.admin_headers()))

    h.tower.mode = "error500"
    await get("/x", {"X-API-Key": DURING_OUTAGE}, 503)
    h.tower.mode = "garbage"
    await get("/x", {"X-API-Key": VALID}, 503)  # dropped from the cache above
    h.tower.mode = "ok"

    t.add(await h.metrics())


def collect(h: Harness, t: Transcript, caplog: pytest.LogCaptureFixture, sink: io.StringIO) -> None:
    h.gateway.access_log.close()  # flushes the writer thread
    access = sink.getvalue()
    assert access.count("\n") >= 18  # the access log really was written
    t.add(access)
    assert any("tower fault" in r.getMessage() for r in caplog.records)  # logs were captured
    for record in caplog.records:
        t.add(record.getMessage())
        if record.exc_text:
            t.add(record.exc_text)
        t.add(repr(record.args))
    for seen in h.upstream.seen:
        t.add(seen.path)
        t.parts.extend(
            f"{name}: {value}" for name, values in seen.headers.items() for value in values
        )


async def test_no_secret_leaks_anywhere(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture, transcript: Transcript
) -> None:
    caplog.set_level(logging.DEBUG)
    sink = io.StringIO()
    h = await make_gateway(access_log=AccessLog(sink))
    h.tower.add(VALID, key_id="k1", user_id="u1", role="operator", scopes=["tools:execute"])
    h.tower.add(LIMITED, key_id="k3", user_id="u3", role="operator", rate_limit=2)
    await drive(h, transcript)
    collect(h, transcript, caplog, sink)
    assert len(h.upstream.seen) >= 5
    assert transcript.leaks(SECRETS + CLIENT_KEYS) == []


async def test_transcript_would_catch_a_leak(transcript: Transcript) -> None:
    # The check above is only as good as its collector: make sure it can fail.
    transcript.add(f"authorization: Bearer {VALID}")
    assert transcript.leaks(CLIENT_KEYS) == [(VALID, f"authorization: Bearer {VALID}")]


async def test_access_log_lines_identify_without_the_key(make_gateway: GatewayFactory) -> None:
    import json

    sink = io.StringIO()
    h = await make_gateway(access_log=AccessLog(sink))
    h.tower.add(VALID, key_id="k1", user_id="u1", role="operator")
    assert (
        await h.client.get("/x?a=1", headers={"X-API-Key": VALID, "X-Request-Id": "rid-1"})
    ).status == 200
    assert (await h.client.get("/x", headers={"X-API-Key": INVALID})).status == 401
    h.gateway.access_log.close()
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert len(lines) == 2
    ok, denied = lines
    assert ok["request_id"] == "rid-1" and ok["status"] == 200 and ok["decision"] == "allow"
    assert ok["key_id"] == "k1" and ok["user"] == "u1" and ok["route"] == "root"
    assert ok["key"] and VALID not in json.dumps(ok)
    assert ok["path"] == "/x"  # no query string
    assert denied["status"] == 401 and denied["reason"] == "invalid_key"
    assert denied["decision"] == "deny"
    assert INVALID not in sink.getvalue()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /x?api_key=" + VALID.encode() + b"\x01 HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: gw\r\nX-API-Key: " + VALID.encode() + b"\x01z\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: gw\r\nX-API-Key: " + VALID.encode() + b"a" * 9000 + b"\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: gw\r\nX-API-Key " + VALID.encode() + b"\r\n\r\n",
        VALID.encode() + b" /x HTTP/1.1\r\n\r\n",
    ],
)
async def test_unparsable_requests_never_log_their_bytes(
    gw: Harness, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    assert gw.client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    writer.write(request_bytes)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    assert answer.split(b" ", 2)[1] == b"400"
    logged = [r for r in caplog.records if r.name == "tower_gateway.http"]
    assert logged, "the parse error is still logged"
    text = "\n".join(
        r.getMessage() + (r.exc_text or "") + logging.Formatter().format(r) for r in caplog.records
    )
    assert VALID not in text
    assert gw.tower.calls == []
