"""ResilientTower: retries, the time budget, the circuit breaker and the concurrency cap.

Every tower here is real HTTP on loopback: the shared `fake_tower`, or a small
scripted tower that fails its first calls, answers slowly and counts how many
calls it is serving at once. Where the breaker's periods matter, a clock the
test moves stands in for waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import make_tower
from gateway.config import TowerConfig
from gateway.errors import ConfigError, TowerFault
from gateway.tower import Identity, Rejection
from gateway.tower.client import RemoteTower
from gateway.tower.resilient import CircuitState, ResilientTower
from tests.conftest import (
    TOWER_API_KEY,
    TOWER_SECRET,
    FakeTower,
    GatewayFactory,
    gateway_config,
    tower_record,
    until,
)

FAST: Final = 0.05  # "fails fast": well under any tower round trip with retries


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class ScriptedTower:
    """Answers 500 for the first `failures` calls, then a valid identity; counts concurrency."""

    failures: int = 0
    delay: float = 0.0
    calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/validate", self._validate)
        return app

    async def _validate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.calls <= self.failures:
                return web.json_response({"error": "overloaded"}, status=500)
            key = body["api_key"]
            return web.json_response(tower_record(f"id-{key}", "u1", "operator"))
        finally:
            self.in_flight -= 1


@pytest.fixture
async def scripted(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> ScriptedTower:
    tower = ScriptedTower()
    server = await aiohttp_server(tower.app(), host="127.0.0.1")
    tower.url = str(server.make_url("")).rstrip("/")
    return tower


class Towers:
    """Builds ResilientTowers around real RemoteTowers; records every breaker transition."""

    def __init__(self) -> None:
        self.made: list[ResilientTower] = []
        self.states: list[CircuitState] = []

    def __call__(self, url: str, *, timeout: float = 1.0, **options: Any) -> ResilientTower:
        inner = RemoteTower(
            TowerConfig(url=url, api_key=TOWER_API_KEY, secret=TOWER_SECRET, timeout=timeout)
        )
        options.setdefault("budget", timeout)
        options.setdefault("base_delay", 0.01)
        tower = ResilientTower(inner, on_state_change=self.states.append, **options)
        self.made.append(tower)
        return tower


@pytest.fixture
async def make() -> AsyncIterator[Towers]:
    towers = Towers()
    yield towers
    for tower in towers.made:
        await tower.close()


async def fault_of(tower: ResilientTower, key: str = "k") -> TowerFault:
    with pytest.raises(TowerFault) as info:
        await tower.validate(key)
    return info.value


# --------------------------------------------------------------------------- retries


async def test_transient_server_error_is_retried(scripted: ScriptedTower, make: Towers) -> None:
    scripted.failures = 1
    tower = make(scripted.url)
    answer = await tower.validate("k")
    assert isinstance(answer, Identity) and answer.key_id == "id-k"
    assert scripted.calls == 2
    assert tower.state == "closed"


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("garbage", "malformed"),
        ("wrong_types", "malformed"),
        ("unauthorized", "tower_auth"),
        ("redirect", "redirect"),
    ],
)
async def test_answers_that_will_not_change_are_not_retried(
    fake_tower: FakeTower, make: Towers, mode: str, kind: str
) -> None:
    fake_tower.mode = mode
    fault = await fault_of(make(fake_tower.url, retries=3))
    assert fault.kind == kind
    assert len(fake_tower.calls) == 1


async def test_a_rejection_is_an_answer_not_retried(fake_tower: FakeTower, make: Towers) -> None:
    tower = make(fake_tower.url, retries=3)
    assert await tower.validate("unknown-key") == Rejection("invalid_key")
    assert len(fake_tower.calls) == 1


async def test_backoff_doubles_up_to_the_cap(scripted: ScriptedTower, make: Towers) -> None:
    scripted.failures = 4
    caps: list[float] = []

    def jitter(cap: float) -> float:
        caps.append(cap)
        return 0.0

    tower = make(scripted.url, retries=4, base_delay=0.01, max_delay=0.03, jitter=jitter)
    assert isinstance(await tower.validate("k"), Identity)
    assert caps == pytest.approx([0.01, 0.02, 0.03, 0.03])
    assert scripted.calls == 5


async def test_retries_are_bounded(scripted: ScriptedTower, make: Towers) -> None:
    scripted.failures = 100
    fault = await fault_of(make(scripted.url, retries=2))
    assert fault.kind == "server_error"
    assert scripted.calls == 3


# --------------------------------------------------------------------------- the budget


async def test_budget_bounds_all_attempts_together(fake_tower: FakeTower, make: Towers) -> None:
    fake_tower.mode = "hang"
    tower = make(fake_tower.url, timeout=0.3, retries=2)
    started = time.perf_counter()
    fault = await fault_of(tower)
    elapsed = time.perf_counter() - started
    assert fault.kind == "timeout"
    assert 0.25 <= elapsed < 0.45, elapsed  # one budget, not 0.3 x 3 attempts
    assert len(fake_tower.calls) == 1


async def test_no_retry_is_started_that_cannot_finish(
    scripted: ScriptedTower, make: Towers
) -> None:
    # Each attempt takes 0.15 s: the second fits in the 0.4 s budget, a third would not.
    scripted.failures, scripted.delay = 100, 0.15
    tower = make(scripted.url, timeout=0.4, retries=5, jitter=lambda _cap: 0.0)
    started = time.perf_counter()
    fault = await fault_of(tower)
    elapsed = time.perf_counter() - started
    assert fault.kind == "server_error"  # the real fault, not a budget timeout
    assert scripted.calls == 2
    assert elapsed < 0.4


async def test_refused_connection_is_retried_within_the_budget(make: Towers) -> None:
    # Port 9 (discard) on loopback: nothing listens, so every attempt is refused.
    tower = make("http://127.0.0.1:9", timeout=0.5, retries=2, breaker_threshold=10)
    started = time.perf_counter()
    fault = await fault_of(tower)
    assert fault.kind == "refused"
    assert time.perf_counter() - started < 0.5


# --------------------------------------------------------------------------- the breaker


async def open_breaker(tower: ResilientTower, times: int) -> None:
    for _ in range(times):
        assert (await fault_of(tower)).kind == "server_error"


async def test_breaker_opens_after_consecutive_faults(fake_tower: FakeTower, make: Towers) -> None:
    fake_tower.mode = "error500"
    tower = make(fake_tower.url, retries=0, breaker_threshold=3)
    await open_breaker(tower, 2)
    assert tower.state == "closed"
    await open_breaker(tower, 1)
    assert tower.state == "open"
    assert make.states == ["open"]

    started = time.perf_counter()
    fault = await fault_of(tower)
    assert fault.kind == "circuit_open"
    assert time.perf_counter() - started < FAST
    assert len(fake_tower.calls) == 3


async def test_each_attempt_counts_and_retries_stop_when_it_opens(
    fake_tower: FakeTower, make: Towers
) -> None:
    fake_tower.mode = "error500"
    tower = make(fake_tower.url, retries=5, breaker_threshold=2)
    fault = await fault_of(tower)
    assert fault.kind == "server_error"  # what the tower did, not "circuit_open"
    assert len(fake_tower.calls) == 2
    assert tower.state == "open"


async def test_a_rejection_counts_as_success(fake_tower: FakeTower, make: Towers) -> None:
    tower = make(fake_tower.url, retries=0, breaker_threshold=3)
    fake_tower.mode = "error500"
    await open_breaker(tower, 2)
    fake_tower.mode = "ok"
    assert isinstance(await tower.validate("unknown-key"), Rejection)
    fake_tower.mode = "error500"
    await open_breaker(tower, 2)
    assert tower.state == "closed"


async def test_half_open_lets_exactly_one_probe_through(
    scripted: ScriptedTower, make: Towers
) -> None:
    clock = Clock()
    scripted.failures = 2
    tower = make(scripted.url, retries=0, breaker_threshold=2, breaker_reset=5.0, clock=clock)
    await open_breaker(tower, 2)
    clock.advance(4.9)
    assert (await fault_of(tower)).kind == "circuit_open"
    assert scripted.calls == 2

    clock.advance(0.2)
    scripted.delay = 0.1  # the probe is still in flight while the others arrive
    results = await asyncio.gather(
        *(tower.validate(f"k{i}") for i in range(10)), return_exceptions=True
    )
    answers = [r for r in results if isinstance(r, Identity)]
    faults = [r for r in results if isinstance(r, TowerFault)]
    assert len(answers) == 1 and len(faults) == 9
    assert {f.kind for f in faults} == {"circuit_open"}
    assert scripted.calls == 3
    assert tower.state == "closed"
    assert make.states == ["open", "half_open", "closed"]

    scripted.delay = 0.0
    assert isinstance(await tower.validate("k"), Identity)


async def test_failed_probe_opens_for_another_period(fake_tower: FakeTower, make: Towers) -> None:
    clock = Clock()
    fake_tower.mode = "error500"
    tower = make(fake_tower.url, retries=3, breaker_threshold=1, breaker_reset=5.0, clock=clock)
    await open_breaker(tower, 1)
    clock.advance(5.0)
    assert (await fault_of(tower)).kind == "server_error"  # the probe: one call, no retries
    assert len(fake_tower.calls) == 2
    assert tower.state == "open"

    clock.advance(4.0)
    assert (await fault_of(tower)).kind == "circuit_open"
    assert len(fake_tower.calls) == 2
    fake_tower.mode = "ok"
    clock.advance(1.0)
    assert isinstance(await tower.validate("unknown-key"), Rejection)
    assert tower.state == "closed"
    assert make.states == ["open", "half_open", "open", "half_open", "closed"]


async def test_a_cancelled_probe_frees_the_probe_slot(fake_tower: FakeTower, make: Towers) -> None:
    clock = Clock()
    fake_tower.mode = "error500"
    tower = make(fake_tower.url, retries=0, breaker_threshold=1, breaker_reset=1.0, clock=clock)
    await open_breaker(tower, 1)
    clock.advance(1.0)
    fake_tower.mode = "hang"
    calls = len(fake_tower.calls)
    probe = asyncio.ensure_future(tower.validate("k"))
    await until(lambda: len(fake_tower.calls) == calls + 1, what="the probe at the tower")
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    fake_tower.mode = "ok"
    assert isinstance(await tower.validate("unknown-key"), Rejection)
    assert tower.state == "closed"


# --------------------------------------------------------------------------- concurrency


async def test_concurrency_towards_the_tower_is_bounded(
    scripted: ScriptedTower, make: Towers
) -> None:
    scripted.delay = 0.05
    tower = make(scripted.url, timeout=2.0, max_concurrency=3)
    results = await asyncio.gather(*(tower.validate(f"k{i}") for i in range(12)))
    assert all(isinstance(r, Identity) for r in results)
    assert scripted.calls == 12
    assert scripted.max_in_flight == 3


async def test_waiting_for_a_slot_counts_against_the_budget(
    scripted: ScriptedTower, make: Towers
) -> None:
    scripted.delay = 0.2
    tower = make(scripted.url, timeout=0.3, retries=0, max_concurrency=1, breaker_threshold=10)
    started = time.perf_counter()
    results = await asyncio.gather(
        *(tower.validate(f"k{i}") for i in range(4)), return_exceptions=True
    )
    elapsed = time.perf_counter() - started
    assert isinstance(results[0], Identity)
    assert all(isinstance(r, TowerFault) and r.kind == "timeout" for r in results[1:])
    assert elapsed < 0.4  # not 4 x 0.2 s queued behind one slot
    # The second call got the slot with 0.1 s left and timed out at the tower; the
    # others ran out of budget waiting for a slot, without calling the tower.
    assert scripted.calls <= 3


async def test_start_ping_close_are_forwarded(fake_tower: FakeTower, make: Towers) -> None:
    fake_tower.mode = "error500"
    tower = make(fake_tower.url, retries=0, breaker_threshold=1)
    assert tower.name == "remote"
    await tower.start()
    await open_breaker(tower, 1)
    # Readiness reports the tower itself, not the breaker's memory of it.
    assert await tower.ping() is True
    assert len(fake_tower.calls) == 1


# --------------------------------------------------------------------------- the whole gateway


def circuit_gauge(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("tower_gateway_tower_circuit_state "):
            return float(line.split()[1])
    raise AssertionError("tower_gateway_tower_circuit_state not exported")


async def test_gateway_fails_fast_serves_stale_and_recovers(make_gateway: GatewayFactory) -> None:
    # One hand-moved clock for the cache's TTLs and the breaker's reset period.
    clock = Clock(time.time())
    gw = await make_gateway(
        clock=clock,
        tower_clock=clock,
        tower={"timeout": 0.5, "retries": 1, "breaker_threshold": 2, "breaker_reset": 0.3},
        cache={"ttl": 0.2, "stale_if_error": 30, "negative_ttl": 0},
    )
    gw.tower.add("cached-key", key_id="k1", user_id="u1", role="operator")
    gw.tower.add("other-key", key_id="k2", user_id="u2", role="operator")
    cached = {"X-API-Key": "cached-key"}
    assert (await gw.client.get("/x", headers=cached)).status == 200
    assert circuit_gauge(await gw.metrics()) == 0

    gw.tower.mode = "error500"
    clock.advance(0.25)  # the cached identity is no longer fresh
    response = await gw.client.get("/x", headers={"X-API-Key": "other-key"})
    assert response.status == 503  # two faulty attempts: the breaker opens
    assert gw.gateway.tower.state == "open"
    assert circuit_gauge(await gw.metrics()) == 2

    calls = len(gw.tower.calls)
    started = time.perf_counter()
    response = await gw.client.get("/x", headers={"X-API-Key": "other-key"})
    assert response.status == 503
    assert response.headers["Retry-After"]
    assert (await response.json())["error"] == "tower_unavailable"
    assert time.perf_counter() - started < FAST
    assert (await gw.client.get("/x", headers=cached)).status == 200  # stale-if-error
    assert len(gw.tower.calls) == calls  # the open breaker spared the tower
    assert "circuit_open" in await gw.metrics()

    gw.tower.mode = "ok"
    clock.advance(0.35)  # breaker_reset: the next call is the probe
    assert (await gw.client.get("/x", headers={"X-API-Key": "other-key"})).status == 200
    assert gw.gateway.tower.state == "closed"
    assert circuit_gauge(await gw.metrics()) == 0
    assert len(gw.tower.calls) == calls + 1


# --------------------------------------------------------------------------- configuration


def test_config_fields_are_checked_and_wired(fake_tower: FakeTower) -> None:
    with pytest.raises(ConfigError) as info:
        gateway_config(fake_tower.url, "http://127.0.0.1:9000", tower={"breaker_threshold": 0})
    assert info.value.path == "tower.breaker_threshold"
    with pytest.raises(ConfigError) as info:
        gateway_config(fake_tower.url, "http://127.0.0.1:9000", tower={"retries": -1})
    assert info.value.path == "tower.retries"

    config = gateway_config(fake_tower.url, "http://127.0.0.1:9000", tower={"retries": 0})
    assert config.tower.max_concurrency == 64 and config.tower.budget is None


async def test_only_the_remote_tower_is_wrapped(fake_tower: FakeTower, tmp_path: Path) -> None:
    remote = make_tower(gateway_config(fake_tower.url, "http://127.0.0.1:9000"))
    assert isinstance(remote, ResilientTower) and isinstance(remote.inner, RemoteTower)
    await remote.close()
    local_config = gateway_config(
        fake_tower.url, "http://127.0.0.1:9000", tower={"local": {"db": str(tmp_path / "k.db")}}
    )
    local = make_tower(local_config)
    assert not isinstance(local, ResilientTower)
    await local.close()
