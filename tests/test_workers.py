"""`serve --workers N` as real processes: one port, a supervising parent, merged ops.

The fake tower and upstream run in the test's event loop on 127.0.0.1; the
gateway group runs as `python -m gateway serve --workers 2`. Every fixture
kills whatever the group left behind, found through /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import load_config, parse_config_text
from gateway.replicas.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign_webhook
from gateway.runtime.group_ops import merge_cache_stats, merge_expositions
from gateway.runtime.slots import backoff
from gateway.runtime.workers import WorkerGroup
from tests.conftest import (
    ADMIN_TOKEN,
    ENV,
    JWT_SECRET,
    TOWER_API_KEY,
    TOWER_SECRET,
    FakeTower,
    FakeUpstream,
)
from tests.conftest import until as shared_until

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
WEBHOOK_SECRET = "webhook-secret-for-worker-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="uses /proc to find worker processes"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (a group's config path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and running(int(entry.name)):
                found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


@dataclass
class Group:
    process: subprocess.Popen[bytes]
    config_path: Path
    port: int
    ops_port: int
    log_path: Path
    session: aiohttp.ClientSession
    pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    def leftovers(self) -> list[int]:
        return processes_mentioning(str(self.config_path))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.get(self.url + path, **kw) as response:
            return response.status, await response.json()

    async def ops_json(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.request(method, self.ops + path, **kw) as response:
            return response.status, await response.json()

    async def metrics(self) -> str:
        async with self.session.get(self.ops + "/metrics") as response:
            assert response.status == 200
            return await response.text()

    async def workers(self) -> list[dict[str, Any]]:
        status, body = await self.ops_json("GET", "/admin/workers", headers=ADMIN)
        assert status == 200, body
        workers: list[dict[str, Any]] = body["workers"]
        self.pids.update(w["pid"] for w in workers if w["pid"])
        return workers

    async def wait_exit(self, within: float) -> int | None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.05)
        return None

    async def stop(self) -> None:
        """SIGTERM the group; SIGKILL the parent and every worker it ever had if that fails."""
        if self.process.poll() is None:
            self.pids.update(children_of(self.process.pid))
            self.process.terminate()
            if await self.wait_exit(10) is None:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in self.pids | set(self.leftovers()):
            if running(pid):
                os.kill(pid, signal.SIGKILL)


async def until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """The shared `until`, where a group that is not listening yet means "not yet"."""
    await shared_until(check, within, what, interval=0.05, ignore=(aiohttp.ClientError, OSError))


def write_config(
    path: Path, tower_url: str, upstream_url: str, port: int, ops_port: int, **extra: Any
) -> None:
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_timeout": 5},
        "ops": {"host": "127.0.0.1", "port": ops_port},
        "tower": {"url": tower_url, "timeout": 3.0},
        "routes": [
            {"path": "/admin", "upstream": upstream_url, "require": ["admin:write"]},
            {"path": "/", "upstream": upstream_url},
        ],
        "rate_limit": {"default_per_minute": 100000},
        "log": {"access": False},
        **extra,
    }
    path.write_text(yaml.safe_dump(data))


StartGroup = Callable[..., Awaitable[Group]]


@pytest.fixture
async def start_group(
    fake_tower: FakeTower, fake_upstream: FakeUpstream, tmp_path: Path
) -> AsyncIterator[StartGroup]:
    fake_tower.add("good-key", key_id="k1", user_id="u1", role="operator")
    fake_tower.add("admin-key", key_id="k2", user_id="u2", role="admin")
    groups: list[Group] = []
    # A short private TMPDIR: the workers' sockets live there (unix paths are
    # limited to ~107 bytes) and nothing is left in /tmp if a parent is killed.
    socket_tmp = tempfile.mkdtemp(prefix="tgw-")
    session = aiohttp.ClientSession(
        # A fresh connection per request, so SO_REUSEPORT spreads them over the workers.
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=10),
    )

    async def start(*, wait_ready: bool = True, port: int | None = None, **extra: Any) -> Group:
        port, ops_port = port or free_port(), free_port()
        config = tmp_path / f"gateway-{len(groups)}.yaml"
        write_config(config, fake_tower.url, fake_upstream.url, port, ops_port, **extra)
        log_path = tmp_path / f"group-{len(groups)}.log"
        env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT), "TMPDIR": socket_tmp}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--config",
                    str(config),
                    "--workers",
                    "2",
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        group = Group(process, config, port, ops_port, log_path, session)
        groups.append(group)
        if wait_ready:

            async def ready() -> bool:
                workers = await group.workers()
                return all(w["ready"] for w in workers)

            try:
                await until(ready, START_TIMEOUT, "two ready workers")
            except AssertionError:
                raise AssertionError(group.log()) from None
        return group

    try:
        yield start
    finally:
        for group in groups:
            await group.stop()
        await session.close()
        shutil.rmtree(socket_tmp, ignore_errors=True)


def dockerfile_healthcheck() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK, with python as sys.executable."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("HEALTHCHECK"))
    argv: list[str] = json.loads(line[line.index(" CMD ") + 5 :])
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


async def _contains(group: Group, text: str) -> bool:
    return text in group.log()


def samples_by_worker(text: str, family_name: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            for sample in family.samples:
                worker = sample.labels["worker"]
                totals[worker] = totals.get(worker, 0.0) + sample.value
    return totals


# --------------------------------------------------------------------------- the group


async def test_group_serves_the_contract_on_one_port(
    start_group: StartGroup, fake_upstream: FakeUpstream
) -> None:
    group = await start_group()
    # The parent and two workers (which is how later tests find leftovers).
    assert len(group.leftovers()) == 3

    status, body = await group.get("/hello", headers={"X-API-Key": "good-key"})
    assert status == 200, body
    token = fake_upstream.seen[-1].header("Authorization")
    assert token is not None and token.startswith("Bearer ")
    claims = jwt.decode(
        token.removeprefix("Bearer "), JWT_SECRET, algorithms=["HS256"], audience="internal"
    )
    assert claims["sub"] == "u1" and claims["key_id"] == "k1"
    assert fake_upstream.seen[-1].header("X-API-Key") is None

    status, body = await group.get("/hello")
    assert status == 401 and body["error"] == "missing_key"
    status, body = await group.get("/admin/x", headers={"X-API-Key": "good-key"})
    assert status == 403 and body["detail"] == "Missing required capability: admin:write"

    # New connections are spread by the kernel: both workers end up with traffic.
    for _ in range(40):
        status, _ = await group.get("/spread", headers={"X-API-Key": "good-key"})
        assert status == 200
    text = await group.metrics()
    per_worker = samples_by_worker(text, "tower_gateway_requests")
    assert set(per_worker) == {"0", "1"} and all(v > 0 for v in per_worker.values())
    assert sum(per_worker.values()) == 43
    # HELP and TYPE once per family, however many workers report it.
    assert text.count("# TYPE tower_gateway_requests_total counter\n") == 1
    assert text.count("# HELP tower_gateway_requests_total ") == 1
    assert samples_by_worker(text, "tower_gateway_worker_up") == {"0": 1.0, "1": 1.0}

    status, body = await group.ops_json("GET", "/healthz")
    assert status == 200 and body["status"] == "ok"
    status, body = await group.ops_json("GET", "/readyz")
    assert status == 200 and body["ready"] and len(body["workers"]) == 2
    status, body = await group.ops_json("GET", "/.well-known/jwks.json")
    assert status == 200 and "keys" in body

    # The image's HEALTHCHECK command, pointed at this group's ops port.
    argv = [a.replace(":9091/", f":{group.ops_port}/") for a in dockerfile_healthcheck()]
    check = await asyncio.create_subprocess_exec(*argv)
    assert await asyncio.wait_for(check.wait(), 10) == 0


async def test_admin_requests_reach_every_worker(start_group: StartGroup) -> None:
    group = await start_group(admin={"webhook_secret": WEBHOOK_SECRET})
    status, body = await group.ops_json("GET", "/admin/cache")
    assert status == 401
    status, body = await group.ops_json(
        "DELETE", "/admin/cache", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}
    )
    assert status == 401

    seen: list[Any] = []

    async def both_cached() -> bool:
        seen.append(await group.get("/c", headers={"X-API-Key": "good-key"}))
        status, stats = await group.ops_json("GET", "/admin/cache", headers=ADMIN)
        seen.append((status, stats))
        return all(w["valid_cached_keys"] == 1 for w in stats["workers"])

    try:
        await until(both_cached, 15, "the key cached in both workers")
    except AssertionError:
        raise AssertionError(f"{seen[-6:]}\n{group.log()}") from None
    status, stats = await group.ops_json("GET", "/admin/cache", headers=ADMIN)
    assert status == 200
    assert stats["valid_cached_keys"] == 2 and stats["total_cached_keys"] == 2
    hits = sum(w["hits"] for w in stats["workers"])
    misses = sum(w["misses"] for w in stats["workers"])
    assert (stats["hits"], stats["misses"]) == (hits, misses)
    assert stats["cache_hit_ratio"] == pytest.approx(hits / (hits + misses), abs=1e-6)

    status, body = await group.ops_json("DELETE", "/admin/cache/k1", headers=ADMIN)
    assert status == 200 and body == {"key_id": "k1", "dropped_entries": 2, "workers": 2}
    await until(both_cached, 15, "the key cached again in both workers")

    # The tower's signed revocation webhook reaches every worker, signature intact.
    payload = json.dumps({"key_ids": ["k1"]}).encode()
    stamp = str(int(time.time()))
    signed = {
        **ADMIN,
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign_webhook(WEBHOOK_SECRET, stamp, payload),
    }
    status, body = await group.ops_json("POST", "/admin/revocations", data=payload, headers=signed)
    assert status == 200 and body == {"revoked": 1, "dropped_entries": 2, "workers": 2}
    forged = {**signed, SIGNATURE_HEADER: sign_webhook("x" * 32, stamp, payload)}
    status, body = await group.ops_json("POST", "/admin/revocations", data=payload, headers=forged)
    assert status == 401 and body["error"] == "bad_signature"
    await until(both_cached, 15, "the key cached again in both workers")

    status, body = await group.ops_json("DELETE", "/admin/cache", headers=ADMIN)
    assert status == 200 and body == {"cleared": True, "workers": 2}
    _, stats = await group.ops_json("GET", "/admin/cache", headers=ADMIN)
    assert [w["total_cached_keys"] for w in stats["workers"]] == [0, 0]

    # Other admin endpoints: reads from one worker, actions on every worker.
    status, body = await group.ops_json("GET", "/admin/config", headers=ADMIN)
    assert status == 200 and "config" in body
    status, body = await group.ops_json("POST", "/admin/reload", headers=ADMIN)
    assert status == 200 and [w["status"] for w in body["workers"]] == [200, 200]
    status, body = await group.ops_json("GET", "/admin/audit?limit=1000", headers=ADMIN)
    assert status == 200
    stamps = [event["ts"] for event in body["events"]]
    assert stamps == sorted(stamps, reverse=True)
    assert {event["worker"] for event in body["events"]} == {0, 1}
    status, body = await group.ops_json("GET", "/admin/audit?limit=0", headers=ADMIN)
    assert status == 400


async def test_a_killed_worker_is_replaced_without_stopping_service(
    start_group: StartGroup,
) -> None:
    group = await start_group()
    before = await group.workers()
    victim = before[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    await shared_until(lambda: not running(victim), 5, "the killed worker to be gone")
    # The survivor takes every new connection while the slot is empty.
    for _ in range(20):
        status, _ = await group.get("/during", headers={"X-API-Key": "good-key"})
        assert status == 200

    async def replaced() -> bool:
        slot = (await group.workers())[0]
        return slot["ready"] and slot["pid"] not in (None, victim) and slot["restarts"] == 1

    await until(replaced, 10, "a replacement worker")
    after = await group.workers()
    assert after[1]["pid"] == before[1]["pid"] and after[1]["restarts"] == 0
    assert set(children_of(group.process.pid)) == {after[0]["pid"], after[1]["pid"]}

    async def replacement_serves() -> bool:
        await group.get("/after", headers={"X-API-Key": "good-key"})
        return samples_by_worker(await group.metrics(), "tower_gateway_requests").get("0", 0) > 0

    await until(replacement_serves, 10, "the replacement to serve requests")
    text = await group.metrics()
    assert samples_by_worker(text, "tower_gateway_worker_restarts") == {"0": 1.0, "1": 0.0}
    assert "signal SIGKILL" in group.log()


async def test_sigterm_drains_in_flight_requests_and_exits_zero(
    start_group: StartGroup, fake_upstream: FakeUpstream
) -> None:
    group = await start_group()
    pids = [w["pid"] for w in await group.workers()]
    # SIGHUP is forwarded (each worker reloads); nobody stops.
    group.process.send_signal(signal.SIGHUP)
    await until(lambda: _contains(group, "SIGHUP"), 5, "the SIGHUP to be handled")

    async def both_reloaded() -> bool:
        status, body = await group.ops_json("GET", "/admin/audit?limit=1000", headers=ADMIN)
        reloads = [e for e in body["events"] if e.get("action") == "reload"]
        return status == 200 and {e["worker"] for e in reloads} == {0, 1}

    await until(both_reloaded, 10, "both workers to reload")
    assert [w["pid"] for w in await group.workers()] == pids
    slow = asyncio.ensure_future(group.get("/sleep?s=1", headers={"X-API-Key": "good-key"}))
    await shared_until(
        lambda: any(seen.path.startswith("/sleep") for seen in fake_upstream.seen),
        10,
        "the request to reach the upstream through a worker",
    )
    group.process.send_signal(signal.SIGTERM)
    status, body = await slow
    assert status == 200 and body == {"slept": True}
    assert await group.wait_exit(15) == 0, group.log()
    assert not [pid for pid in pids if running(pid)] and not group.leftovers()
    assert "Fatal Python error" not in group.log() and "Traceback" not in group.log()
    assert refused(group.port) and refused(group.ops_port)


async def test_workers_stop_by_themselves_when_the_parent_is_killed(
    start_group: StartGroup,
) -> None:
    group = await start_group()
    pids = [w["pid"] for w in await group.workers()]
    group.process.kill()
    assert await group.wait_exit(5) == -signal.SIGKILL
    await shared_until(lambda: not any(running(pid) for pid in pids), 10, "the workers to stop")
    assert refused(group.port)
    assert "Fatal Python error" not in group.log() and "Traceback" not in group.log()


async def test_a_config_a_worker_cannot_use_stops_the_group_with_exit_2(
    start_group: StartGroup, tmp_path: Path
) -> None:
    # The file exists, so the parent's load passes; the worker's key load fails.
    key_file = tmp_path / "not-a-key.pem"
    key_file.write_text("not a PEM key\n")
    group = await start_group(
        wait_ready=False, jwt={"algorithm": "RS256", "private_key_file": str(key_file)}
    )
    code = await group.wait_exit(START_TIMEOUT)
    assert code == 2, group.log()
    assert "jwt.private_key_file" in group.log()
    assert not group.leftovers()


async def test_a_taken_port_stops_the_group_with_exit_1(start_group: StartGroup) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        group = await start_group(wait_ready=False, port=taken.getsockname()[1])
        code = await group.wait_exit(START_TIMEOUT)
    assert code == 1, group.log()
    assert "cannot listen" in group.log()
    assert "never retrieved" not in group.log()
    assert not group.leftovers()


async def test_a_hung_worker_is_killed_and_replaced(
    fake_tower: FakeTower, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    # In-process supervisor (short health intervals); the workers are real processes.
    config_path = tmp_path / "gateway.yaml"
    secrets = {
        "tower": {"url": fake_tower.url, "api_key": TOWER_API_KEY, "secret": TOWER_SECRET},
        "jwt": {"secret": JWT_SECRET},
        "admin": {"token": ADMIN_TOKEN},
    }
    write_config(
        config_path, fake_tower.url, fake_upstream.url, free_port(), free_port(), **secrets
    )
    socket_dir = tempfile.mkdtemp(prefix="tgw-")
    group = WorkerGroup(
        load_config(config_path, env={}),
        str(config_path),
        2,
        socket_dir=socket_dir,
        health_interval=0.2,
        health_failures=2,
    )
    stop, force = asyncio.Event(), asyncio.Event()
    running_group = asyncio.ensure_future(group.run(stop, force))
    pids: set[int] = set()

    def slot_pid(index: int) -> int | None:
        process = group.slots[index].process
        if process is not None:
            pids.add(process.pid)
        return process.pid if process is not None else None

    async def all_ready() -> bool:
        return all(slot.ready.is_set() for slot in group.slots)

    try:
        await until(all_ready, START_TIMEOUT, "two ready workers")
        victim = slot_pid(1)
        assert victim is not None
        os.kill(victim, signal.SIGSTOP)  # alive, but its event loop never runs again

        async def replaced() -> bool:
            slot = group.slots[1]
            return slot.ready.is_set() and slot_pid(1) != victim and slot.restarts == 1

        await until(replaced, 15, "the hung worker to be replaced")
        assert not running(victim)
        assert group.slots[0].restarts == 0
    finally:
        stop.set()
        code = await asyncio.wait_for(running_group, 30)
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert code == 0


async def test_key_changes_happen_once_and_reach_every_worker(
    start_group: StartGroup, tmp_path: Path
) -> None:
    group = await start_group(tower={"local": {"db": str(tmp_path / "keys.db")}})
    status, created = await group.ops_json(
        "POST", "/admin/keys", json={"user_id": "wendy", "role": "operator"}, headers=ADMIN
    )
    assert status == 201, created
    key, key_id = created["key"], created["record"]["key_id"]
    status, listing = await group.ops_json("GET", "/admin/keys", headers=ADMIN)
    assert status == 200 and [k["key_id"] for k in listing["keys"]] == [key_id]  # one, not two

    async def both_cached() -> bool:
        await group.get("/c", headers={"X-API-Key": key})
        _, stats = await group.ops_json("GET", "/admin/cache", headers=ADMIN)
        return all(w["valid_cached_keys"] == 1 for w in stats["workers"])

    await until(both_cached, 15, "the key cached in both workers")
    status, revoked = await group.ops_json(
        "POST", f"/admin/keys/{key_id}/revoke", json={}, headers=ADMIN
    )
    assert status == 200, revoked
    assert revoked["record"]["status"] == "revoked"
    assert revoked["workers"] == 2 and revoked["workers_missing"] == []
    assert revoked["dropped_entries"] == 2
    _, stats = await group.ops_json("GET", "/admin/cache", headers=ADMIN)
    assert [w["valid_cached_keys"] for w in stats["workers"]] == [0, 0]
    for _ in range(10):  # fresh connections: both workers answer
        status, body = await group.get("/c", headers={"X-API-Key": key})
        assert status == 401, body

    status, rotated = await group.ops_json(
        "POST", f"/admin/keys/{key_id}/rotate", json={}, headers=ADMIN
    )
    assert status == 409 and rotated["error"] == "conflict"
    status, other = await group.ops_json(
        "POST", "/admin/keys", json={"user_id": "vic", "role": "operator"}, headers=ADMIN
    )
    status, rotated = await group.ops_json(
        "POST", f"/admin/keys/{other['record']['key_id']}/rotate", json={}, headers=ADMIN
    )
    assert status == 201 and rotated["workers"] == 2 and rotated["key"] != other["key"]
    _, listing = await group.ops_json("GET", "/admin/keys", headers=ADMIN)
    assert listing["total"] == 3  # each change made once

    # The page is served by the supervisor itself, with its policy.
    async with group.session.get(group.ops + "/admin/ui") as response:
        assert response.status == 200 and response.content_type == "text/html"
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]


# --------------------------------------------------------------------------- pure helpers


def test_merge_expositions_labels_every_sample_and_keeps_one_header() -> None:
    page = (
        '# HELP t_total Things\n# TYPE t_total counter\nt_total{kind="a"} 2.0\n'
        "# HELP h Latency\n# TYPE h histogram\n"
        'h_bucket{le="1.0"} 1.0\nh_bucket{le="+Inf"} 1.0\nh_count 1.0\nh_sum 0.5\n'
    )
    families, bad = merge_expositions([("0", page), ("1", page), ("2", "garbage{{{ x")])
    assert bad == ["2"]
    by_name = {f.name: f for f in families}
    assert {s.labels["worker"] for s in by_name["t"].samples} == {"0", "1"}
    assert [s.labels for s in by_name["t"].samples] == [
        {"kind": "a", "worker": "0"},
        {"kind": "a", "worker": "1"},
    ]
    assert len(by_name["h"].samples) == 8


def test_merge_cache_stats_sums_counters_and_recomputes_the_ratio() -> None:
    merged = merge_cache_stats(
        [
            {
                "hits": 3,
                "misses": 1,
                "total_cached_keys": 2,
                "valid_cached_keys": 1,
                "cache_hit_ratio": 0.75,
                "max_entries": 10,
            },
            {
                "hits": 0,
                "misses": 4,
                "total_cached_keys": 1,
                "valid_cached_keys": 1,
                "cache_hit_ratio": 0.0,
                "max_entries": 10,
            },
        ]
    )
    assert merged == {
        "hits": 3,
        "misses": 5,
        "total_cached_keys": 3,
        "valid_cached_keys": 2,
        "cache_hit_ratio": 0.375,
    }
    assert merge_cache_stats([])["cache_hit_ratio"] == 0.0


def test_backoff_grows_and_is_capped() -> None:
    assert [backoff(n) for n in range(5)] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert backoff(50) == 30.0


# --------------------------------------------------------------------------- deployment files


def test_kubernetes_manifests_parse_and_carry_a_valid_gateway_config() -> None:
    documents = []
    for path in sorted((ROOT / "config" / "k8s").glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents}
    assert {kind for kind, _ in kinds} >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
    }
    config_maps = [d for d in documents if d["kind"] == "ConfigMap"]
    text = config_maps[0]["data"]["gateway.yaml"]
    env = {
        "TOWER_API_KEY": "k",
        "TOWER_SECRET": "s",
        "GATEWAY_JWT_SECRET": "j" * 32,
        "GATEWAY_ADMIN_TOKEN": "a" * 16,
        "GATEWAY_FINGERPRINT_SECRET": "f" * 32,
    }
    config = parse_config_text(text, env=env)
    assert config.rate_limit.backend == "redis" and config.redis.url
    assert config.ops.port == 9091 and config.ops.host == "0.0.0.0"

    gateway = next(
        d
        for d in documents
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "tower-gateway"
    )
    pod = gateway["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9091"
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    secrets = [d for d in documents if d["kind"] == "Secret"]
    assert all(v == "REPLACE_ME" for d in secrets for v in d["stringData"].values())


def test_dockerfile_runs_the_gateway_as_a_non_root_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert "\nUSER " in text and "HEALTHCHECK" in text and "EXPOSE 8080 9091" in text
    assert 'CMD ["tower-gateway", "serve", "--host", "0.0.0.0"]' in text
