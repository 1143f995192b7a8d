"""Hot reload: `POST /admin/reload` and SIGHUP re-read the file; a bad file changes nothing;
restart-only keys are named, not applied; a request finishes on the config it started with,
and a reload under load loses no request."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from gateway.app import Gateway
from gateway.config import load_config
from gateway.ops.admin import config_json
from gateway.ops.reload import merge
from tests.conftest import (
    ADMIN_TOKEN,
    ENV,
    SECRETS,
    FakeTower,
    FakeUpstream,
    Harness,
    quiet_server,
)
from tests.conftest import until as shared_until
from tests.test_ops import sample
from tests.test_workers import START_TIMEOUT, StartGroup, free_port, until, write_config
from tests.test_workers import start_group as start_group  # a fixture, shared

GOOD = {"X-API-Key": "good-key-1"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROOT = Path(__file__).resolve().parent.parent


def config_data(
    tower_url: str, upstream_url: str, *, admin_require: list[str], **extra: Any
) -> Any:
    data: dict[str, Any] = {
        "tower": {"url": tower_url, "timeout": 2.0},
        "routes": [
            {"path": "/admin", "upstream": upstream_url, "require": admin_require},
            {"path": "/", "upstream": upstream_url},
        ],
        "rate_limit": {"default_per_minute": 1_000_000},
        "log": {"access": False, "audit": None},
    }
    for section, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    return data


@dataclass
class FileGateway:
    harness: Harness
    path: Path
    tower: str
    upstream: str

    def write(self, *, admin_require: list[str], **extra: Any) -> None:
        data = config_data(self.tower, self.upstream, admin_require=admin_require, **extra)
        self.path.write_text(yaml.safe_dump(data))

    async def reload(self, status: int = 200) -> dict[str, Any]:
        response = await self.harness.ops.post("/admin/reload", headers=ADMIN)
        body: dict[str, Any] = await response.json()
        assert response.status == status, body
        return body


StartFile = Callable[..., Awaitable[FileGateway]]


@pytest.fixture
async def file_gateway(
    fake_tower: FakeTower,
    fake_upstream: FakeUpstream,
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> FileGateway:
    """A gateway loaded from a file, as `serve` loads it (the environment holds the secrets)."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    fake_tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    path = tmp_path / "gateway.yaml"
    files = FileGateway(None, path, fake_tower.url, fake_upstream.url)  # type: ignore[arg-type]
    files.write(admin_require=["admin:write"])
    gateway = Gateway(load_config(path), registry=CollectorRegistry())
    client = await aiohttp_client(await quiet_server(gateway.proxy_app()))
    ops = await aiohttp_client(await quiet_server(gateway.ops_app()))
    files.harness = Harness(gateway, client, ops, fake_tower, fake_upstream)
    return files


async def status_of(h: Harness, path: str = "/admin/x") -> int:
    return (await h.client.get(path, headers=GOOD)).status


async def test_reload_applies_a_changed_route(file_gateway: FileGateway) -> None:
    h = file_gateway.harness
    assert await status_of(h) == 403
    before = sample(await h.metrics(), "tower_gateway_config_last_reload_success_timestamp_seconds")
    assert before is not None and before > 0

    file_gateway.write(admin_require=[])
    await asyncio.sleep(0.01)
    body = await file_gateway.reload()
    assert body["reloaded"] is True and body["changed"] == ["routes"]
    assert body["restart_required"] == [] and "warning" not in body
    assert body["source"] == str(file_gateway.path.resolve())
    assert await status_of(h) == 200

    text = await h.metrics()
    assert sample(text, "tower_gateway_config_reloads_total", outcome="success") == 1
    assert sample(text, "tower_gateway_config_reloads_total", outcome="failure") == 0
    after = sample(text, "tower_gateway_config_last_reload_success_timestamp_seconds")
    assert after is not None and after > before
    assert sample(text, "tower_gateway_config_last_reload_successful") == 1

    # Reloading an unchanged file is a success that changes nothing.
    assert (await file_gateway.reload())["changed"] == []
    events = (await (await h.ops.get("/admin/audit", headers=ADMIN)).json())["events"]
    reloads = [e for e in events if e.get("action") == "reload"]
    assert [e["changed"] for e in reloads] == [[], ["routes"]]
    assert reloads[0]["trigger"] == "api" and reloads[0]["client"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("content", "path"),
    [
        ("routes: [{path: /, upstream: not-a-url}]\n", "routes[0].upstream"),
        ("routes: [\n", ""),
        ("surprise: 1\n", "surprise"),
    ],
)
async def test_an_invalid_file_keeps_the_running_config(
    file_gateway: FileGateway, caplog: pytest.LogCaptureFixture, content: str, path: str
) -> None:
    h = file_gateway.harness
    file_gateway.path.write_text(content)
    body = await file_gateway.reload(status=422)
    assert body["reloaded"] is False and body["error"] == "invalid_config"
    assert body["path"] == path and body["detail"]
    assert await status_of(h) == 403  # the old mapping still serves
    assert any(
        r.levelno == logging.ERROR and "config reload (api) failed" in r.getMessage()
        for r in caplog.records
    )
    text = await h.metrics()
    assert sample(text, "tower_gateway_config_reloads_total", outcome="failure") == 1
    assert sample(text, "tower_gateway_config_last_reload_successful") == 0
    events = (await (await h.ops.get("/admin/audit", headers=ADMIN)).json())["events"]
    reload = next(e for e in events if e.get("action") == "reload")
    assert reload["outcome"] == "failure" and reload["path"] == path

    file_gateway.write(admin_require=[])
    await file_gateway.reload()
    assert await status_of(h) == 200
    assert sample(await h.metrics(), "tower_gateway_config_last_reload_successful") == 1


async def test_restart_only_keys_are_named_and_kept(
    file_gateway: FileGateway, caplog: pytest.LogCaptureFixture
) -> None:
    h = file_gateway.harness
    file_gateway.write(
        admin_require=[],
        server={"port": 18080, "trusted_proxies": ["10.0.0.0/8"]},
        tower={"timeout": 7.5},
        cache={"ttl": 5},
        rate_limit={"default_per_minute": 7},
    )
    body = await file_gateway.reload()
    assert body["changed"] == ["server.trusted_proxies", "routes", "rate_limit.default_per_minute"]
    assert body["restart_required"] == ["server.port", "tower.timeout", "cache.ttl"]
    assert "server.port, tower.timeout, cache.ttl" in body["warning"]
    assert any(
        r.levelno == logging.WARNING
        and "server.port, tower.timeout, cache.ttl changed but only a restart" in r.getMessage()
        for r in caplog.records
    )
    assert sample(await h.metrics(), "tower_gateway_config_restart_pending") == 3

    config = (await (await h.ops.get("/admin/config", headers=ADMIN)).json())["config"]
    assert config["server"]["port"] == 8080 and config["tower"]["timeout"] == 2.0
    assert config["cache"]["ttl"] == 300 and config["rate_limit"]["default_per_minute"] == 7
    assert config["server"]["trusted_proxies"] == ["10.0.0.0/8"]
    assert config["routes"][0]["require"] == []
    assert await status_of(h) == 200


async def test_a_request_finishes_on_the_config_it_started_with(
    file_gateway: FileGateway,
) -> None:
    h = file_gateway.harness
    file_gateway.write(admin_require=[])
    await file_gateway.reload()
    h.tower.gate = asyncio.Event()  # the request is inside its tower call when the reload lands
    calls = len(h.tower.calls)
    in_flight = asyncio.create_task(h.client.get("/admin/x", headers=GOOD))
    await shared_until(lambda: len(h.tower.calls) > calls, what="the request's tower call")
    file_gateway.write(admin_require=["admin:write"])
    assert (await file_gateway.reload())["changed"] == ["routes"]
    h.tower.gate.set()
    assert (await in_flight).status == 200  # all of the old config, not the new require
    assert await status_of(h) == 403


async def test_reload_under_load_loses_no_request(file_gateway: FileGateway) -> None:
    h = file_gateway.harness
    statuses: Counter[int] = Counter()
    errors: list[str] = []

    async def client() -> None:
        for _ in range(200):
            try:
                async with h.client.get("/admin/x", headers=GOOD) as response:
                    await response.read()
                    statuses[response.status] += 1
            except aiohttp.ClientError as exc:
                errors.append(repr(exc))

    async def reloads() -> None:
        for i in range(5):
            # Spread over the load: the i-th reload once (i + 1) / 6 of it is done.
            while sum(statuses.values()) < (i + 1) * 800 // 6:
                await asyncio.sleep(0.001)
            file_gateway.write(admin_require=[] if i % 2 == 0 else ["admin:write"])
            assert (await file_gateway.reload())["changed"] == ["routes"]

    await asyncio.gather(*(client() for _ in range(4)), reloads())
    assert errors == []
    assert sum(statuses.values()) == 800
    assert set(statuses) <= {200, 403}, statuses
    assert statuses[200] > 0 and statuses[403] > 0


async def test_effective_config_redacts_every_secret(
    file_gateway: FileGateway, tmp_path: Path
) -> None:
    file_gateway.write(
        admin_require=[],
        admin={"webhook_secret": "webhook-secret-0123456789"},
        cache={"fingerprint_secret": "fingerprint-secret-0123456789-abcdef"},
        redis={"url": "redis://user:redis-password-123@127.0.0.1:6390/0?password=q-secret-9"},
    )
    await file_gateway.reload()  # redis and cache are restart-only: read the file directly too
    h = file_gateway.harness
    response = await h.ops.get("/admin/config", headers=ADMIN)
    assert response.status == 200
    text = await response.text()
    body = await response.json()
    config = body["config"]
    assert config["tower"]["api_key"] == "<redacted>" and config["tower"]["secret"] == "<redacted>"
    assert config["jwt"]["secret"] == "<redacted>" and config["admin"]["token"] == "<redacted>"
    assert config["tower"]["url"] == h.tower.url
    assert body["last_reload"]["reloaded"] is True
    for secret in SECRETS:
        assert secret not in text

    fresh = config_json(load_config(file_gateway.path))
    assert fresh["admin"]["webhook_secret"] == "<redacted>"
    assert fresh["cache"]["fingerprint_secret"] == "<redacted>"
    assert fresh["redis"]["url"] == ("redis://user:<redacted>@127.0.0.1:6390/0?password=<redacted>")
    dumped = repr(fresh)
    for secret in ("webhook-secret", "fingerprint-secret", "redis-password", "q-secret", *SECRETS):
        assert secret not in dumped
    assert (await h.ops.get("/admin/config")).status == 401


def test_merge_takes_live_keys_and_names_the_rest(tmp_path: Path) -> None:
    tower, upstream = "http://127.0.0.1:1", "http://127.0.0.1:2"
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(config_data(tower, upstream, admin_require=[])))
    running = load_config(path, env=ENV)
    changed = config_data(
        tower,
        upstream,
        admin_require=["x"],
        tower={"timeout": 3.0},
        jwt={"ttl": 60},
        log={"level": "DEBUG", "access": True},
        websocket={"auth_timeout": 3},
    )
    path.write_text(yaml.safe_dump(changed))
    loaded = load_config(path, env=ENV)
    effective, live, restart = merge(running, loaded)
    assert live == ("routes", "jwt", "websocket", "log.level")
    assert restart == ("tower.timeout", "log.access")
    assert effective.routes == loaded.routes and effective.websocket == loaded.websocket
    assert effective.log.level == "DEBUG" and effective.log.access is False
    assert effective.tower == running.tower
    assert merge(running, running)[1:] == ((), ())


# --------------------------------------------------------------------------- a real process


async def test_sighup_reloads_a_running_serve_process(
    fake_tower: FakeTower, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    port, ops_port = free_port(), free_port()
    path = tmp_path / "gateway.yaml"

    def write(admin_require: list[str] | None) -> None:
        if admin_require is None:
            path.write_text("routes: [\n")  # not YAML
            return
        data = config_data(
            fake_tower.url,
            fake_upstream.url,
            admin_require=admin_require,
            server={"port": port, "shutdown_timeout": 2},
            ops={"port": ops_port},
        )
        path.write_text(yaml.safe_dump(data))

    write(["admin:write"])
    log_path = tmp_path / "serve.log"
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}/admin/x"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def status() -> int:
                async with session.get(url, headers=GOOD) as response:
                    return response.status

            async def is_(expected: int) -> bool:
                return await status() == expected

            await until(lambda: is_(403), START_TIMEOUT, "the gateway serving")
            write([])
            process.send_signal(signal.SIGHUP)
            await until(lambda: is_(200), 5, "the reloaded route")
            write(None)
            process.send_signal(signal.SIGHUP)
            await until(
                lambda: asyncio.sleep(0, "failed" in log_path.read_text()),
                5,
                "the failed reload logged",
            )
            assert await status() == 200  # still serving the last good config
            async with session.get(f"http://127.0.0.1:{ops_port}/metrics") as response:
                text = await response.text()
            assert sample(text, "tower_gateway_config_reloads_total", outcome="success") == 1
            assert sample(text, "tower_gateway_config_reloads_total", outcome="failure") == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    output = log_path.read_text()
    assert "config reload (sighup) failed" in output and "Traceback" not in output
    assert "good-key-1" not in output


# --------------------------------------------------------------------------- several workers


async def test_a_worker_group_reloads_and_answers_the_admin_api(
    start_group: StartGroup, fake_tower: FakeTower, fake_upstream: FakeUpstream
) -> None:
    group = await start_group()
    key = {"X-API-Key": "good-key"}

    def rewrite(require: list[str] | None) -> None:
        if require is None:
            group.config_path.write_text("routes: [\n")
            return
        routes = [
            {"path": "/admin", "upstream": fake_upstream.url, "require": require},
            {"path": "/", "upstream": fake_upstream.url},
        ]
        write_config(
            group.config_path,
            fake_tower.url,
            fake_upstream.url,
            group.port,
            group.ops_port,
            routes=routes,
        )

    async def every_answer(expected: int) -> bool:
        # Fresh connections: the kernel spreads them over both workers.
        for _ in range(12):
            status, _ = await group.get("/admin/x", headers=key)
            if status != expected:
                return False
        return True

    assert await every_answer(403)
    rewrite([])
    status, body = await group.ops_json("POST", "/admin/reload", headers=ADMIN)
    assert status == 200 and body["reloaded"] is True, body
    assert [(w["worker"], w["changed"]) for w in body["workers"]] == [
        (0, ["routes"]),
        (1, ["routes"]),
    ]
    assert await every_answer(200)

    status, body = await group.ops_json("GET", "/admin/audit?limit=1000", headers=ADMIN)
    assert status == 200 and body["workers_missing"] == []
    events = body["events"]
    assert {e["worker"] for e in events} == {0, 1}
    assert [e["ts"] for e in events] == sorted((e["ts"] for e in events), reverse=True)
    reloads = [e for e in events if e.get("action") == "reload"]
    assert len(reloads) == 2 and all(e["client"] == "127.0.0.1" for e in reloads)
    status, body = await group.ops_json("GET", "/admin/audit?limit=0", headers=ADMIN)
    assert status == 400
    status, body = await group.ops_json("GET", "/admin/audit?limit=3", headers=ADMIN)
    assert len(body["events"]) == 3

    status, body = await group.ops_json("GET", "/admin/config", headers=ADMIN)
    assert status == 200 and body["config"]["routes"][0]["require"] == []
    assert body["config"]["admin"]["token"] == "<redacted>"

    explain = {"key": "good-key", "method": "DELETE", "path": "/admin/x"}
    status, body = await group.ops_json("POST", "/admin/explain", json=explain, headers=ADMIN)
    assert status == 200 and body["decision"] == "allow" and body["method"] == "DELETE"
    # A fingerprint is cached by whichever worker served it: the supervisor asks each.
    fingerprint = next(e["key"] for e in events if e.get("event") == "auth" and e["key"])
    for _ in range(4):
        by_fingerprint = {"fingerprint": fingerprint, "path": "/x"}
        status, body = await group.ops_json(
            "POST", "/admin/explain", json=by_fingerprint, headers=ADMIN
        )
        assert status == 200 and body["identity"]["key_id"] == "k1"
    status, body = await group.ops_json(
        "POST", "/admin/explain", json={"fingerprint": "0" * 16, "path": "/x"}, headers=ADMIN
    )
    assert status == 404 and body["error"] == "unknown_fingerprint"

    rewrite(None)
    status, body = await group.ops_json("POST", "/admin/reload", headers=ADMIN)
    assert status == 422 and body["error"] == "invalid_config" and len(body["workers"]) == 2
    assert await every_answer(200)

    # SIGHUP to the supervisor reaches every worker.
    rewrite(["admin:write"])
    group.process.send_signal(signal.SIGHUP)
    await until(lambda: every_answer(403), 10, "both workers reloaded by SIGHUP")
    text = await group.metrics()
    for worker in ("0", "1"):
        assert (
            sample(text, "tower_gateway_config_reloads_total", outcome="success", worker=worker)
            == 2
        )
        assert (
            sample(text, "tower_gateway_config_reloads_total", outcome="failure", worker=worker)
            == 1
        )
    assert group.process.poll() is None


# --------------------------------------------------------------------------- the signing key


def _kid(token: str) -> str:
    import jwt as pyjwt

    return str(pyjwt.get_unverified_header(token)["kid"])


async def _forwarded_kid(h: Harness) -> str:
    response = await h.client.get("/data", headers=GOOD)
    assert response.status == 200
    authorization = h.upstream.seen[-1].header("authorization")
    assert authorization is not None
    return _kid(authorization.removeprefix("Bearer "))


async def test_a_replaced_key_file_is_a_new_key_at_once(
    file_gateway: FileGateway, tmp_path: Path
) -> None:
    """Rotation after a leak: the same file name, new contents, one reload."""
    from tests.test_tokens import write_key

    h = file_gateway.harness
    key_file = write_key(tmp_path / "first", "RS256")
    jwt_section = {"algorithm": "RS256", "private_key_file": str(key_file)}
    file_gateway.write(admin_require=["admin:write"], jwt=jwt_section)
    body = await file_gateway.reload()
    assert body["changed"] == ["jwt"] and body["restart_required"] == []
    old_kid = await _forwarded_kid(h)
    assert old_kid == await _forwarded_kid(h)  # reused while the key stays

    key_file.write_bytes(write_key(tmp_path / "second", "RS256").read_bytes())
    body = await file_gateway.reload()
    assert body["changed"] == ["jwt"] and body["restart_required"] == []
    new_kid = await _forwarded_kid(h)
    assert new_kid != old_kid  # the cached token of the old key is not reused
    jwks = (await (await h.ops.get("/.well-known/jwks.json")).json())["keys"]
    assert [k["kid"] for k in jwks] == [new_kid, old_kid]  # the old one, one token lifetime
    assert all("d" not in k for k in jwks)

    # Nothing changed: nothing is claimed, and the key stays.
    body = await file_gateway.reload()
    assert body["changed"] == [] and body["restart_required"] == []
    assert await _forwarded_kid(h) == new_kid


async def test_the_old_public_key_leaves_the_jwks_after_one_token_lifetime(
    file_gateway: FileGateway, tmp_path: Path
) -> None:
    from gateway.auth.tokens import load_signing_key
    from gateway.config import JwtConfig
    from tests.test_tokens import write_key

    h = file_gateway.harness
    minter = h.gateway.minter
    ttl = h.gateway.config.jwt.ttl
    first = write_key(tmp_path / "a", "EdDSA")
    second = write_key(tmp_path / "b", "EdDSA")
    config = JwtConfig(algorithm="EdDSA", private_key_file=str(first))
    minter.rotate(load_signing_key(config), config)
    other = JwtConfig(algorithm="EdDSA", private_key_file=str(second))
    now = time.time()
    minter.rotate(load_signing_key(other), other)
    assert len(minter.jwks()["keys"]) == 2
    minter._clock = lambda: now + ttl + 1  # type: ignore[misc]
    assert [k["kid"] for k in minter.jwks()["keys"]] == [minter.kid]
