"""Usage reports to the tower (CONTRACT section 11): batched `POST /api/v1/usage`, off the
request path, bounded, retried with the next report when the tower fails; the embedded tower
records them and `keys list`/`keys show` show them."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from gateway.app import Gateway
from gateway.tower.server import create_tower_app
from gateway.tower.store import KeyStore
from gateway.tower.usage import UsageRecorder, parse_report, report_body
from tests.conftest import (
    TOWER_API_KEY,
    TOWER_SECRET,
    FakeTower,
    FakeUpstream,
    gateway_config,
    quiet_server,
    until,
)
from tests.test_keys_cli import _clean_env, _create, config, run

__all__ = ["_clean_env", "config"]  # the fixtures of the CLI tests

KEY = "reported-key-1"


class UsageTower(FakeTower):
    """The fake tower, with a usage endpoint that records every report (or fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[dict[str, Any]] = []
        self.report_headers: list[dict[str, str]] = []
        self.usage_mode = "ok"  # ok | error500 | hang

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/api/v1/usage", self._usage)
        return app

    async def _usage(self, request: web.Request) -> web.Response:
        self.report_headers.append(dict(request.headers))
        if self.usage_mode == "hang":
            await asyncio.sleep(3600)
        if self.usage_mode == "error500":
            return web.json_response({"error": "boom"}, status=500)
        self.reports.append(await request.json())
        return web.json_response({"recorded": len(self.reports[-1]["keys"])})

    def totals(self) -> dict[str, dict[str, int]]:
        """Requests by key_id and status over every report received."""
        out: dict[str, dict[str, int]] = {}
        for report in self.reports:
            for entry in report["keys"]:
                statuses = out.setdefault(entry["key_id"], {})
                for status, n in entry["statuses"].items():
                    statuses[status] = statuses.get(status, 0) + n
        return out


Start = Callable[..., Awaitable[tuple[TestClient, UsageTower, Gateway]]]


@pytest.fixture
async def start(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    fake_upstream: FakeUpstream,
) -> Start:
    async def go(**report: Any) -> tuple[TestClient, UsageTower, Gateway]:
        tower = UsageTower()
        server = await aiohttp_server(tower.app(), host="127.0.0.1")
        tower.url = str(server.make_url("")).rstrip("/")
        usage = {"interval": 0.1, **report}
        cfg = gateway_config(tower.url, fake_upstream.url, tower={"usage_report": usage})
        gateway = Gateway(cfg, registry=CollectorRegistry())
        client = await aiohttp_client(await quiet_server(gateway.proxy_app()))
        tower.add(KEY, key_id="k1", user_id="u1", role="operator")
        tower.add("other-key-1", key_id="k2", user_id="u2", role="operator")
        return client, tower, gateway

    return go


async def test_uses_are_reported_in_batches_with_key_ids_and_statuses(start: Start) -> None:
    client, tower, _ = await start()
    before = time.time()
    for path in ("/data", "/data", "/admin/x", "/data"):
        await client.get(path, headers={"X-API-Key": KEY})
    await client.get("/data", headers={"X-API-Key": "other-key-1"})
    await client.get("/data", headers={"X-API-Key": "unknown-key-1"})  # no key_id: not reported
    await until(lambda: tower.totals().get("k2"), within=3.0, what="a usage report")
    assert tower.totals() == {"k1": {"200": 3, "403": 1}, "k2": {"200": 1}}
    entries = [e for r in tower.reports for e in r["keys"] if e["key_id"] == "k1"]
    assert sum(e["requests"] for e in entries) == 4  # in one report or split over two
    assert all(before <= e["last_used_at"] <= time.time() for e in entries)
    headers = tower.report_headers[0]
    assert headers["Authorization"] == f"Bearer {TOWER_API_KEY}"
    assert headers["X-Tower-Secret"] == TOWER_SECRET
    assert KEY not in json.dumps(tower.reports) and "other-key-1" not in json.dumps(tower.reports)

    await asyncio.sleep(0.3)  # nothing used since: nothing sent
    count = len(tower.reports)
    await asyncio.sleep(0.3)
    assert len(tower.reports) == count


async def test_a_failing_tower_gets_the_counts_with_the_next_report(start: Start) -> None:
    client, tower, gateway = await start()
    tower.usage_mode = "error500"
    for _ in range(3):
        assert (await client.get("/data", headers={"X-API-Key": KEY})).status == 200
    await until(
        lambda: gateway.metrics.usage_reports.labels("failed")._value.get() >= 1,
        within=3.0,
        what="a failed report",
    )
    assert (await client.get("/data", headers={"X-API-Key": KEY})).status == 200
    tower.usage_mode = "ok"
    await until(lambda: tower.totals().get("k1", {}).get("200") == 4, within=3.0, what="retry")
    assert tower.totals() == {"k1": {"200": 4}}  # each use once, none lost or doubled


async def test_a_hanging_tower_never_delays_a_request(start: Start) -> None:
    client, tower, _ = await start()
    tower.usage_mode = "hang"
    await client.get("/data", headers={"X-API-Key": KEY})
    await asyncio.sleep(0.3)  # a report is now hanging
    began = time.monotonic()
    for _ in range(20):
        assert (await client.get("/data", headers={"X-API-Key": KEY})).status == 200
    assert time.monotonic() - began < 2.0


def test_the_recorder_holds_at_most_max_keys_and_counts_what_it_drops() -> None:
    recorder = UsageRecorder(max_keys=3, clock=lambda: 100.0)
    for i in range(5):
        recorder.record(f"k{i}", 200)
    recorder.record("k0", 500)
    assert len(recorder) == 3 and recorder.dropped == 2 and recorder.full.is_set()
    taken = recorder.take()
    assert len(recorder) == 0 and not recorder.full.is_set()
    body = report_body(taken)
    assert body[0] == {
        "key_id": "k0",
        "requests": 2,
        "last_used_at": 100.0,
        "statuses": {"200": 1, "500": 1},
    }
    recorder.record("k9", 200)
    recorder.record("k8", 200)
    recorder.restore(taken)  # k0 fits (a third key); k1 and k2 do not
    assert len(recorder) == 3 and recorder.dropped == 4
    assert parse_report({"keys": report_body(recorder.take())})[2]["requests"] == 2


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"keys": {}},
        {"keys": [{"key_id": "", "requests": 1, "last_used_at": 1, "statuses": {}}]},
        {"keys": [{"key_id": "k", "requests": -1, "last_used_at": 1, "statuses": {}}]},
        {"keys": [{"key_id": "k", "requests": 1, "last_used_at": "x", "statuses": {}}]},
        {"keys": [{"key_id": "k", "requests": 1, "last_used_at": 1, "statuses": {"ok": 1}}]},
        {"keys": [{"key_id": "k", "requests": 1, "last_used_at": 1, "statuses": {"200": True}}]},
    ],
)
def test_a_malformed_report_is_refused(body: object) -> None:
    with pytest.raises(ValueError):
        parse_report(body)


# --------------------------------------------------------------------------- embedded tower


async def test_the_embedded_tower_records_reports_from_a_gateway(
    capsys: pytest.CaptureFixture[str],
    config: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    fake_upstream: FakeUpstream,
) -> None:
    key, key_id = _create(capsys, config, "--role", "operator")
    store = KeyStore(config.parent / "keys.db", prefix="tk", hash_secret=_secret(config))
    try:
        app = create_tower_app(store, api_key=TOWER_API_KEY, secret=TOWER_SECRET)
        tower = await aiohttp_server(app, host="127.0.0.1")
        url = str(tower.make_url("")).rstrip("/")
        cfg = gateway_config(url, fake_upstream.url, tower={"usage_report": {"interval": 0.1}})
        gateway = Gateway(cfg, registry=CollectorRegistry())
        client = await aiohttp_client(await quiet_server(gateway.proxy_app()))
        for path in ("/data", "/data", "/admin/x"):
            await client.get(path, headers={"X-API-Key": key})
        await until(lambda: sum(store.usage().get(key_id, {}).values()) == 3, within=3.0)
        assert store.usage() == {key_id: {"200": 2, "403": 1}}

        refused = await client.session.post(f"{url}/api/v1/usage", json={"keys": []})
        assert refused.status == 401
        headers = {"Authorization": f"Bearer {TOWER_API_KEY}", "X-Tower-Secret": TOWER_SECRET}
        bad = await client.session.post(f"{url}/api/v1/usage", json={"k": 1}, headers=headers)
        assert bad.status == 400 and (await bad.json())["error"] == "malformed_request"
    finally:
        store.close()

    assert run("keys", "list", "--config", str(config)) == 0
    out = capsys.readouterr().out.splitlines()
    table = [line for line in out if not line.startswith("{")]  # not the gateway's audit lines
    assert "REPORTED" in table[0]
    assert table[1][table[0].index("REPORTED") :].split()[0] == "3"
    assert run("keys", "show", "--config", str(config), key_id) == 0
    shown = capsys.readouterr().out
    assert "by_status:  200: 2, 403: 1" in shown
    assert "last_used:  never" not in shown


def _secret(config: Path) -> bytes:
    from gateway.config import load_config
    from gateway.tower.local import resolve_hash_secret

    local = load_config(config).tower.local
    assert local is not None
    return resolve_hash_secret(local)


def test_a_version_1_key_store_is_migrated(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, key_id = _create(capsys, config, "--role", "operator")
    db = config.parent / "keys.db"
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE key_usage")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = KeyStore(db, prefix="tk", hash_secret=_secret(config))
    try:
        assert (
            store.record_usage(
                [{"key_id": key_id, "requests": 2, "last_used_at": 5.0, "statuses": {"200": 2}}]
            )
            == 1
        )
        assert store.usage(key_id) == {key_id: {"200": 2}}
        assert store.get(key_id).last_used_at == 5.0
    finally:
        store.close()
    version = sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0]
    assert version == 2
