"""The audit trail and the log sinks: one event per authentication and per admin action,
the real client behind trusted proxies, escaped lines, a bounded ring, and sinks that fail
or block without ever stopping a request."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, make_mocked_request
from prometheus_client import CollectorRegistry
from yarl import URL

from gateway.app import Gateway
from gateway.config import load_config, parse_config
from gateway.errors import ConfigError
from gateway.ops.accesslog import AccessLog, RequestRecord
from gateway.ops.audit import AuditLog
from gateway.replicas.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign_webhook
from tests.conftest import (
    ENV,
    SECRETS,
    FakeTower,
    FakeUpstream,
    GatewayFactory,
    Harness,
    quiet_server,
)
from tests.test_ops import sample

GOOD = {"X-API-Key": "good-key-1"}
WEBHOOK_SECRET = "webhook-secret-for-audit-tests"


async def audit_events(h: Harness, limit: int = 1000) -> list[dict[str, Any]]:
    response = await h.ops.get(f"/admin/audit?limit={limit}", headers=h.admin_headers())
    assert response.status == 200
    events: list[dict[str, Any]] = (await response.json())["events"]
    return events


def by_request(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["request_id"]: e for e in events if e["event"] == "auth"}


def captured(h: Harness) -> tuple[io.StringIO, io.StringIO]:
    """Route the gateway's access and audit lines to memory."""
    access, audit = io.StringIO(), io.StringIO()
    h.gateway.access_log = AccessLog(access)
    h.gateway.audit = AuditLog(AccessLog(audit, name="audit-log"))
    return access, audit


def lines(h: Harness, access: io.StringIO, audit: io.StringIO) -> tuple[str, str]:
    h.gateway.access_log.close()  # joins the writer threads: every line is written
    h.gateway.audit.close()
    return access.getvalue(), audit.getvalue()


# --------------------------------------------------------------------------- auth events


async def test_every_authentication_outcome_is_audited_with_its_reason(
    make_gateway: GatewayFactory,
) -> None:
    h = await make_gateway()
    tower = h.tower
    tower.add("good-key-1", key_id="k1", user_id="u1", role="operator", scopes=["tools:execute"])
    tower.add("limited-key", key_id="k3", user_id="u3", role="operator", rate_limit=1)
    tower.add("old-key", key_id="k4", user_id="u4", role="operator", expires_at=time.time() - 5)
    tower.keys["revoked-key"] = {"valid": False, "reason": "revoked"}

    script: list[tuple[str, dict[str, str], int]] = [
        ("success", GOOD, 200),
        ("missing_key", {}, 401),
        ("invalid_key", {"X-API-Key": "nobody-key"}, 401),
        ("expired_key", {"X-API-Key": "old-key"}, 401),
        ("revoked_key", {"X-API-Key": "revoked-key"}, 401),
        ("malformed_key", {"X-API-Key": "two words"}, 400),
        ("limited_ok", {"X-API-Key": "limited-key"}, 200),
        ("rate_limited", {"X-API-Key": "limited-key"}, 429),
    ]
    for rid, headers, status in script:
        response = await h.client.get("/x", headers={**headers, "X-Request-Id": rid})
        assert response.status == status, rid
    response = await h.client.get("/admin/x", headers={**GOOD, "X-Request-Id": "forbidden"})
    assert response.status == 403
    tower.mode = "error500"
    response = await h.client.get(
        "/x", headers={"X-API-Key": "unseen-key", "X-Request-Id": "tower_unavailable"}
    )
    assert response.status == 503

    events = by_request(await audit_events(h))
    expected = {
        "success": ("success", "allow", None),
        "missing_key": ("failure", "deny", "missing_key"),
        "invalid_key": ("failure", "deny", "invalid_key"),
        "expired_key": ("failure", "deny", "expired_key"),
        "revoked_key": ("failure", "deny", "revoked_key"),
        "malformed_key": ("failure", "deny", "malformed_key"),
        "rate_limited": ("failure", "deny", "rate_limited"),
        "forbidden": ("failure", "deny", "missing_capability"),
        "tower_unavailable": ("failure", "error", "tower_unavailable"),
    }
    for rid, (outcome, decision, reason) in expected.items():
        event = events[rid]
        assert (event["outcome"], event["decision"], event["reason"]) == (
            outcome,
            decision,
            reason,
        ), rid
        assert event["type"] == "audit" and event["client"] == "127.0.0.1"
        assert event["method"] == "GET"

    ok = events["success"]
    assert ok["route"] == "root" and ok["path"] == "/x" and ok["source"] == "tower"
    assert (ok["user"], ok["key_id"], ok["role"]) == ("u1", "k1", "operator")
    assert len(ok["key"]) == 16  # the fingerprint, never the key
    forbidden = events["forbidden"]
    assert forbidden["route"] == "admin" and forbidden["missing_capability"] == "admin:write"
    assert forbidden["key"] == ok["key"] and forbidden["role"] == "operator"
    assert events["rate_limited"]["user"] == "u3"
    assert events["missing_key"]["key"] is None

    text = json.dumps(list(events.values()))
    for secret in ("good-key-1", "nobody-key", "old-key", "revoked-key", "limited-key", *SECRETS):
        assert secret not in text


async def test_public_routes_are_not_authentication_events(gw: Harness) -> None:
    assert (await gw.client.get("/public/x", headers={"X-Request-Id": "pub"})).status == 200
    assert "pub" not in by_request(await audit_events(gw))


@pytest.mark.parametrize(
    ("trusted", "forwarded", "client"),
    [
        ([], "198.51.100.1", "127.0.0.1"),  # no trusted proxy: the header is the client's word
        (["127.0.0.0/8"], "198.51.100.1, 203.0.113.5", "203.0.113.5"),
        (["127.0.0.0/8", "10.0.0.0/8"], "198.51.100.1, 203.0.113.5, 10.1.2.3", "203.0.113.5"),
        (["127.0.0.0/8", "10.0.0.0/8"], "10.0.0.1, 10.0.0.2", "10.0.0.1"),
        (["127.0.0.0/8", "10.0.0.0/8"], "not-an-ip, 10.0.0.9", "10.0.0.9"),
        (["127.0.0.0/8"], "", "127.0.0.1"),
    ],
)
async def test_the_client_is_the_rightmost_untrusted_address(
    make_gateway: GatewayFactory, trusted: list[str], forwarded: str, client: str
) -> None:
    h = await make_gateway(server={"trusted_proxies": trusted})
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    access, audit = captured(h)
    headers = {**GOOD, "X-Request-Id": "r1"}
    if forwarded:
        headers["X-Forwarded-For"] = forwarded
    assert (await h.client.get("/x", headers=headers)).status == 200
    assert by_request(await audit_events(h))["r1"]["client"] == client
    access_text, _ = lines(h, access, audit)
    assert json.loads(access_text)["client"] == client


# --------------------------------------------------------------------------- the admin API


async def test_audit_limit_is_bounded_and_newest_first(gw: Harness) -> None:
    for i in range(5):
        await gw.client.get("/x", headers={**GOOD, "X-Request-Id": f"r{i}"})
    events = await audit_events(gw, limit=2)
    assert [e["request_id"] for e in events] == ["r4", "r3"]
    assert events[0]["seq"] > events[1]["seq"]
    response = await gw.ops.get("/admin/audit", headers=gw.admin_headers())
    assert len((await response.json())["events"]) == 5  # the default limit is larger
    for bad in ("0", "1001", "-1", "abc", "1.5", ""):
        response = await gw.ops.get(f"/admin/audit?limit={bad}", headers=gw.admin_headers())
        assert response.status == 400, bad
        body = await response.json()
        assert body["error"] == "bad_request" and "1 to 1000" in body["detail"]
    assert (await gw.ops.get("/admin/audit")).status == 401


def test_the_ring_keeps_only_the_newest_events() -> None:
    audit = AuditLog(AccessLog(None, enabled=False), capacity=5)
    for i in range(12):
        audit.admin("cache_drop", client=None, key_id=f"k{i}")
    recent = audit.recent(100)
    assert [e["key_id"] for e in recent] == ["k11", "k10", "k9", "k8", "k7"]
    assert audit.recent(2) == recent[:2]


async def test_admin_actions_are_audited(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(admin={"webhook_secret": WEBHOOK_SECRET})
    admin = h.admin_headers()
    assert (await h.ops.delete("/admin/cache", headers=admin)).status == 200
    assert (await h.ops.delete("/admin/cache/k%2F1", headers=admin)).status == 200
    wrong = {"Authorization": "Bearer wrong-token-wrong-token"}
    assert (await h.ops.delete("/admin/cache", headers=wrong)).status == 401

    payload = json.dumps({"key_ids": ["k7", "k8"]}).encode()
    stamp = str(int(time.time()))
    signed = {
        **admin,
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign_webhook(WEBHOOK_SECRET, stamp, payload),
    }
    response = await h.ops.post("/admin/revocations", data=payload, headers=signed)
    assert response.status == 200
    forged = {**signed, SIGNATURE_HEADER: sign_webhook("f" * 32, stamp, payload)}
    response = await h.ops.post("/admin/revocations", data=payload, headers=forged)
    assert response.status == 401

    events = [e for e in await audit_events(h) if e["event"] == "admin"]
    assert [(e["action"], e["outcome"]) for e in reversed(events)] == [
        ("cache_clear", "success"),
        ("cache_drop", "success"),
        ("admin_denied", "failure"),
        ("revocation_webhook", "success"),
        ("revocation_webhook", "failure"),
    ]
    drop = events[3]
    assert drop["key_id"] == "k/1" and drop["dropped"] == 0 and drop["client"] == "127.0.0.1"
    assert events[2]["path"] == "/admin/cache" and events[2]["method"] == "DELETE"
    webhook_ok, webhook_forged = events[1], events[0]
    assert webhook_ok["key_ids"] == ["k7", "k8"] and webhook_ok["revoked"] == 2
    assert webhook_forged["status"] == 401 and webhook_forged["key_ids"] == []
    text = json.dumps(events)
    assert all(secret not in text for secret in (*SECRETS, WEBHOOK_SECRET, "wrong-token"))


# --------------------------------------------------------------------------- the lines


async def test_one_escaped_json_line_per_request_and_no_secret(
    gw: Harness,
) -> None:
    access, audit = captured(gw)
    forged = "/x%0D%0A%7B%22type%22:%22access%22,%22status%22:200%7D"
    requests: list[tuple[str, dict[str, str]]] = [
        ("/x", GOOD),
        (forged, GOOD),
        ("/admin/x", GOOD),
        ("/x", {"X-API-Key": "bad-key"}),
        ("/x", {}),
        ("/public/p", {}),
    ]
    for path, headers in requests:
        url = URL(str(gw.client.make_url(path)), encoded=True)
        async with gw.client.session.get(url, headers=headers) as response:
            # 404: the fake upstream's router does not match a path with a newline.
            assert response.status in (200, 401, 403, 404)
    # A User-Agent with quotes, a backslash and bytes beyond ASCII, on the raw wire.
    assert gw.client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    writer.write(
        b"GET /x HTTP/1.1\r\nHost: gw\r\nX-API-Key: good-key-1\r\nConnection: close\r\n"
        b'User-Agent: evil"},{"type":"audit\\ \xc3\xa9\xff\r\n\r\n'
    )
    assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()
    await gw.ops.post(
        "/admin/explain", json={"key": "good-key-1", "path": "/x"}, headers=gw.admin_headers()
    )

    access_text, audit_text = lines(gw, access, audit)
    access_lines = access_text.splitlines()
    assert len(access_lines) == len(requests) + 1  # one line per request, none forged
    parsed = [json.loads(line) for line in access_lines]
    assert all(p["type"] == "access" for p in parsed)
    assert parsed[1]["path"] == '/x\r\n{"type":"access","status":200}'
    assert parsed[-1]["user_agent"].startswith('evil"},{"type":"audit\\ ')
    assert access_text.isascii() and "\r" not in access_text

    audit_lines = [json.loads(line) for line in audit_text.splitlines()]
    assert [e["event"] for e in audit_lines].count("auth") == len(requests) - 1 + 1
    assert audit_lines[-1]["action"] == "explain"
    assert audit_text.isascii() and "\r" not in audit_text
    for secret in ("good-key-1", "bad-key", *SECRETS):
        assert secret not in access_text and secret not in audit_text


def test_writer_escapes_control_characters_in_every_field() -> None:
    sink = io.StringIO()
    log = AccessLog(sink)
    request = make_mocked_request(
        "GET", "/p", headers={"User-Agent": "a\r\nb\x1b[0m\u2028c", "X-Request-Id": "r"}
    )
    record = RequestRecord("r\n1", route="root", status=200, user="u\r\n2", role="x\ty")
    log.write(request, record)
    log.close()
    (line,) = sink.getvalue().splitlines()
    parsed = json.loads(line)
    assert parsed["user_agent"] == "a\r\nb\x1b[0m\u2028c" and parsed["user"] == "u\r\n2"
    assert line.isascii()


# --------------------------------------------------------------------------- failing sinks


class FailingSink(io.StringIO):
    def write(self, text: str) -> int:
        raise RuntimeError("disk on fire")


class BlockingSink(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


async def test_a_failing_sink_never_stops_proxying(gw: Harness) -> None:
    gw.gateway.access_log = AccessLog(FailingSink())
    gw.gateway.audit = AuditLog(AccessLog(FailingSink(), name="audit-log"))
    for _ in range(20):
        assert (await gw.client.get("/x", headers=GOOD)).status == 200
    gw.gateway.access_log.close()
    gw.gateway.audit.close()
    assert gw.gateway.access_log.dropped == 20 and gw.gateway.audit.dropped == 20
    assert (await gw.client.get("/x", headers=GOOD)).status == 200
    text = await gw.metrics()
    # 20, or 21 once the writer has met the last request's line too.
    assert sample(text, "tower_gateway_log_lines_dropped_total", log="access") in (20, 21)
    assert sample(text, "tower_gateway_log_lines_dropped_total", log="audit") in (20, 21)
    # The ring still has them: the admin API does not depend on the sink.
    assert len(by_request(await audit_events(gw))) == 21


async def test_a_blocked_sink_never_slows_requests(gw: Harness) -> None:
    access_sink, audit_sink = BlockingSink(), BlockingSink()
    gw.gateway.access_log = AccessLog(access_sink, queue_size=5)
    gw.gateway.audit = AuditLog(AccessLog(audit_sink, queue_size=5, name="audit-log"))
    started = time.monotonic()
    try:
        for _ in range(100):
            assert (await gw.client.get("/x", headers=GOOD)).status == 200
        assert time.monotonic() - started < 5
        # The writer holds one line; five wait in the queue; the rest were dropped.
        assert gw.gateway.access_log.dropped >= 100 - 6
        assert gw.gateway.audit.dropped >= 100 - 6
    finally:
        access_sink.release.set()
        audit_sink.release.set()
    gw.gateway.access_log.close()
    assert 1 <= len(access_sink.getvalue().splitlines()) <= 6


# --------------------------------------------------------------------------- file sinks


async def test_file_sinks_follow_logrotate(
    fake_tower: FakeTower,
    fake_upstream: FakeUpstream,
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    fake_tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    path = tmp_path / "gateway.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "tower": {"url": fake_tower.url},
                "routes": [{"path": "/", "upstream": fake_upstream.url}],
                "log": {"file": "access.log", "audit": "audit.log"},  # beside the config
            }
        )
    )
    gateway = Gateway(load_config(path), registry=CollectorRegistry())
    client = await aiohttp_client(await quiet_server(gateway.proxy_app()))
    assert (await client.get("/x", headers=GOOD)).status == 200

    async def written(name: str, count: int) -> list[dict[str, Any]]:
        for _ in range(200):  # the writer thread is asynchronous
            if (tmp_path / name).exists():
                found = (tmp_path / name).read_text().splitlines()
                if len(found) >= count:
                    return [json.loads(line) for line in found]
            await asyncio.sleep(0.01)
        raise AssertionError(f"{name} has fewer than {count} lines")

    assert (await written("access.log", 1))[0]["status"] == 200
    assert (await written("audit.log", 1))[0]["event"] == "auth"
    # logrotate moves the files, then sends SIGHUP (here: the same reload).
    (tmp_path / "access.log").rename(tmp_path / "access.log.1")
    (tmp_path / "audit.log").rename(tmp_path / "audit.log.1")
    assert gateway.reloader.reload(trigger="sighup").ok
    assert (await client.get("/y", headers=GOOD)).status == 200
    assert (await written("access.log", 1))[0]["path"] == "/y"
    assert [e.get("action", e["event"]) for e in await written("audit.log", 2)] == [
        "reload",
        "auth",
    ]
    assert len((tmp_path / "access.log.1").read_text().splitlines()) == 1


def test_a_log_file_in_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    data = {"tower": {"url": "http://127.0.0.1:1"}, "log": {"file": "nowhere/access.log"}}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env=ENV, base=tmp_path)
    assert caught.value.path == "log.file"
    with pytest.raises(ConfigError) as caught:
        parse_config({**data, "log": {"audit": str(tmp_path)}}, env=ENV)
    assert caught.value.path == "log.audit"
