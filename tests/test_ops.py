"""The ops listener: health, readiness, metrics after a scripted sequence, and the admin API."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from gateway.app import Gateway
from gateway.config import parse_config
from tests.conftest import (
    ADMIN_TOKEN,
    ENV,
    FakeTower,
    FakeUpstream,
    GatewayFactory,
    Harness,
    tower_record,
)

GOOD = {"X-API-Key": "good-key-1"}
ClientFactory = Callable[..., Awaitable[TestClient]]


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None when absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
        if found == labels:
            return float(match.group(4))
    return None


# --------------------------------------------------------------------------- health


async def test_healthz(gw: Harness) -> None:
    response = await gw.ops.get("/healthz")
    assert response.status == 200


async def test_readyz_with_the_tower_up(gw: Harness) -> None:
    response = await gw.ops.get("/readyz")
    assert response.status == 200
    body = await response.json()
    assert body["ready"] is True and body["checks"]["tower"] is True


async def test_readyz_tower_down_cache_empty_is_503(gw: Harness) -> None:
    assert gw.tower.server is not None
    await gw.tower.server.close()
    response = await gw.ops.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["ready"] is False and body["checks"]["tower"] is False


async def test_readyz_tower_down_cache_can_serve_is_200(gw: Harness) -> None:
    assert (await gw.client.get("/x", headers=GOOD)).status == 200
    assert gw.tower.server is not None
    await gw.tower.server.close()
    response = await gw.ops.get("/readyz")
    assert response.status == 200
    body = await response.json()
    assert body["checks"]["tower"] is False and body["checks"]["cache_can_serve"] is True
    # ... and it really can serve.
    assert (await gw.client.get("/x", headers=GOOD)).status == 200
    # Without the cache it cannot.
    assert (await gw.ops.delete("/admin/cache", headers=gw.admin_headers())).status == 200
    response = await gw.ops.get("/readyz")
    assert response.status == 503


# --------------------------------------------------------------------------- metrics


async def test_metrics_after_a_scripted_sequence(make_gateway: GatewayFactory) -> None:
    h = await make_gateway()
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator", scopes=["tools:execute"])
    h.tower.add("limited-key", key_id="k3", user_id="u3", role="operator", rate_limit=2)
    script = [
        ("/x", GOOD, 200),  # miss, tower valid
        ("/x", GOOD, 200),  # hit
        ("/tools/run", GOOD, 200),  # hit
        ("/admin/x", GOOD, 403),  # hit, missing capability
        ("/x", {"X-API-Key": "bad-key"}, 401),  # miss, tower invalid
        ("/x", {"X-API-Key": "bad-key"}, 401),  # negative hit
        ("/x", {}, 401),  # no key: no cache lookup
        ("/public/x", {}, 200),  # public
        ("/x", {"X-API-Key": "limited-key"}, 200),  # miss, tower valid
        ("/x", {"X-API-Key": "limited-key"}, 200),  # hit
        ("/x", {"X-API-Key": "limited-key"}, 429),  # hit, rate limited
    ]
    for path, headers, status in script:
        response = await h.client.get(path, headers=headers)
        assert response.status == status, (path, headers, await response.text())

    text = await h.metrics()
    assert sample(text, "tower_gateway_cache_hits_total") == 6
    assert sample(text, "tower_gateway_cache_misses_total") == 3
    assert sample(text, "tower_gateway_cache_hit_ratio") == 6 / 9
    assert sample(text, "tower_gateway_cache_entries", kind="positive") == 2
    assert sample(text, "tower_gateway_cache_entries", kind="negative") == 1
    assert sample(text, "tower_gateway_tower_requests_total", outcome="valid") == 2
    assert sample(text, "tower_gateway_tower_requests_total", outcome="invalid_key") == 1
    assert sample(text, "tower_gateway_tower_request_seconds_count", outcome="valid") == 2
    assert sample(text, "tower_gateway_tower_request_seconds_count", outcome="invalid_key") == 1
    assert sample(text, "tower_gateway_auth_total", outcome="success") == 5
    assert sample(text, "tower_gateway_auth_total", outcome="invalid_key") == 2
    assert sample(text, "tower_gateway_auth_total", outcome="missing_key") == 1
    assert sample(text, "tower_gateway_auth_total", outcome="missing_capability") == 1
    assert sample(text, "tower_gateway_auth_total", outcome="rate_limited") == 1
    assert sample(text, "tower_gateway_requests_total", route="root", status="200") == 4
    assert sample(text, "tower_gateway_requests_total", route="root", status="401") == 3
    assert sample(text, "tower_gateway_requests_total", route="root", status="429") == 1
    assert sample(text, "tower_gateway_requests_total", route="tools", status="200") == 1
    assert sample(text, "tower_gateway_requests_total", route="admin", status="403") == 1
    assert sample(text, "tower_gateway_requests_total", route="public", status="200") == 1
    assert sample(text, "tower_gateway_rate_limited_total") == 1
    assert sample(text, "tower_gateway_websocket_connections") == 0
    # Labels are bounded: no key, user or path ever becomes one.
    for forbidden in ("good-key-1", "bad-key", "limited-key", "u1", "/tools/run"):
        assert forbidden not in text


async def test_tower_faults_are_counted_and_logged(
    gw: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    gw.tower.mode = "garbage"
    assert (await gw.client.get("/x", headers=GOOD)).status == 503
    assert any(
        r.levelno >= logging.WARNING and "tower fault (malformed)" in r.getMessage()
        for r in caplog.records
    )
    text = await gw.metrics()
    assert sample(text, "tower_gateway_tower_requests_total", outcome="malformed") == 1
    assert sample(text, "tower_gateway_auth_total", outcome="tower_unavailable") == 1
    assert sample(text, "tower_gateway_requests_total", route="root", status="503") == 1


async def test_unmatched_requests_are_counted_without_the_path(
    make_gateway: GatewayFactory,
) -> None:
    h = await make_gateway(routes=[{"path": "/api", "upstream": "http://127.0.0.1:9"}])
    assert (await h.client.get("/some/secret/path")).status == 404
    text = await h.metrics()
    assert sample(text, "tower_gateway_requests_total", route="unmatched", status="404") == 1
    assert "/some/secret/path" not in text


# --------------------------------------------------------------------------- admin


async def test_admin_needs_the_token(gw: Harness) -> None:
    for method, path in (
        ("GET", "/admin/cache"),
        ("DELETE", "/admin/cache"),
        ("DELETE", "/admin/cache/k1"),
    ):
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-wrong-token"},
            {"Authorization": ADMIN_TOKEN},
            {"Authorization": f"Basic {ADMIN_TOKEN}"},
            {"X-API-Key": "admin-key-1"},
            {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        ):
            response = await gw.ops.request(method, path, headers=headers)
            assert response.status == 401, (method, path, headers)
            body: dict[str, Any] = await response.json()
            assert set(body) == {"error", "detail"}
            assert ADMIN_TOKEN not in await response.text()


async def test_admin_cache_stats_and_clear(gw: Harness) -> None:
    await gw.client.get("/x", headers=GOOD)
    await gw.client.get("/x", headers=GOOD)
    await gw.client.get("/x", headers={"X-API-Key": "bad-key"})
    response = await gw.ops.get("/admin/cache", headers=gw.admin_headers())
    assert response.status == 200
    stats = await response.json()
    assert stats["total_cached_keys"] == 2
    assert stats["valid_cached_keys"] == 1
    assert stats["hits"] == 1 and stats["misses"] == 2
    assert stats["cache_hit_ratio"] == round(1 / 3, 6)

    response = await gw.ops.delete("/admin/cache", headers=gw.admin_headers())
    assert response.status == 200
    stats = await (await gw.ops.get("/admin/cache", headers=gw.admin_headers())).json()
    assert stats["total_cached_keys"] == 0
    await gw.client.get("/x", headers=GOOD)
    assert gw.tower.calls == ["good-key-1", "bad-key", "good-key-1"]


async def test_admin_drop_one_key_id(gw: Harness) -> None:
    await gw.client.get("/x", headers=GOOD)
    await gw.client.get("/x", headers={"X-API-Key": "admin-key-1"})
    response = await gw.ops.delete("/admin/cache/k1", headers=gw.admin_headers())
    assert response.status == 200
    assert (await response.json())["dropped_entries"] == 1
    await gw.client.get("/x", headers=GOOD)
    await gw.client.get("/x", headers={"X-API-Key": "admin-key-1"})
    # k1 went back to the tower; k2 was still cached.
    assert gw.tower.calls == ["good-key-1", "admin-key-1", "good-key-1"]
    response = await gw.ops.delete("/admin/cache/unknown", headers=gw.admin_headers())
    assert response.status == 200
    assert (await response.json())["dropped_entries"] == 0


async def test_admin_disabled_without_a_token(
    fake_tower: FakeTower, fake_upstream: FakeUpstream, aiohttp_client: ClientFactory
) -> None:
    env = {k: v for k, v in ENV.items() if k != "GATEWAY_ADMIN_TOKEN"}
    config = parse_config(
        {
            "tower": {"url": fake_tower.url},
            "routes": [{"path": "/", "upstream": fake_upstream.url}],
            "log": {"access": False},
        },
        env=env,
    )
    assert config.admin.token is None
    gateway = Gateway(config, registry=CollectorRegistry())
    await aiohttp_client(gateway.proxy_app())
    ops = await aiohttp_client(gateway.ops_app())
    for method, path in (
        ("GET", "/admin/cache"),
        ("DELETE", "/admin/cache"),
        ("DELETE", "/admin/cache/k1"),
    ):
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
            response = await ops.request(method, path, headers=headers)
            assert response.status == 404, (method, path, headers)
    assert (await ops.get("/healthz")).status == 200


async def test_drop_during_a_tower_call_is_not_undone_by_its_answer(
    make_gateway: GatewayFactory, aiohttp_server: Callable[..., Awaitable[Any]]
) -> None:
    """A tower answer decided before an admin drop must not repopulate the cache after it."""
    revoked, asked, dropped = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def validate(request: web.Request) -> web.Response:
        body = await request.json()
        valid = body["api_key"] == "good-key-1" and not revoked.is_set()
        if not asked.is_set():
            asked.set()
            await dropped.wait()  # the answer was decided before the drop below
        if not valid:
            return web.json_response({"valid": False}, status=401)
        return web.json_response(tower_record("k1", "u1", "operator"))

    app = web.Application()
    app.router.add_post("/api/v1/validate", validate)
    server = await aiohttp_server(app, host="127.0.0.1")
    h = await make_gateway(tower={"url": str(server.make_url("")).rstrip("/")})
    in_flight = asyncio.create_task(h.client.get("/x", headers=GOOD))
    await asyncio.wait_for(asked.wait(), 5)
    revoked.set()
    response = await h.ops.delete("/admin/cache/k1", headers=h.admin_headers())
    assert response.status == 200
    dropped.set()
    assert (await in_flight).status == 200  # it asked before the revocation
    response = await h.client.get("/x", headers=GOOD)
    assert response.status == 401  # the next request asks the tower again
