"""Metric values after a scripted sequence: cache hits, misses, negative hits, stale serves,
evictions, single-flight waiters, JWT reuse, every status, and bounded labels."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from tests.conftest import GatewayFactory
from tests.test_ops import sample

# Every family the README promises, with the `_total` suffix where Prometheus writes one.
FAMILIES = (
    "tower_gateway_cache_hits",
    "tower_gateway_cache_misses",
    "tower_gateway_cache_hit_ratio",
    "tower_gateway_cache_entries",
    "tower_gateway_cache_negative_hits",
    "tower_gateway_cache_stale_serves",
    "tower_gateway_cache_evictions",
    "tower_gateway_single_flight_waiters",
    "tower_gateway_tower_requests",
    "tower_gateway_tower_request_seconds",
    "tower_gateway_auth",
    "tower_gateway_requests",
    "tower_gateway_upstream_response_seconds",
    "tower_gateway_requests_in_flight",
    "tower_gateway_jwt_tokens",
    "tower_gateway_rate_limited",
    "tower_gateway_rate_limit_fallbacks",
    "tower_gateway_websocket_connections",
    "tower_gateway_would_deny",
    "tower_gateway_config_reloads",
    "tower_gateway_config_last_reload_success_timestamp_seconds",
    "tower_gateway_config_last_reload_successful",
    "tower_gateway_config_restart_pending",
    "tower_gateway_log_lines_dropped",
    "tower_gateway_build_info",
)


async def test_metric_values_after_a_scripted_sequence(make_gateway: GatewayFactory) -> None:
    now = [time.time()]
    h = await make_gateway(
        clock=lambda: now[0],
        cache={"ttl": 10, "negative_ttl": 60, "stale_if_error": 100, "max_entries": 2},
        tower={"retries": 0},
    )
    tower = h.tower
    tower.add("good-key-1", key_id="k1", user_id="u1", role="operator", scopes=["tools:execute"])
    tower.add("limited-key", key_id="k3", user_id="u3", role="operator", rate_limit=2)
    tower.add("third-key", key_id="k5", user_id="u5", role="operator")
    tower.add("flight-key", key_id="k6", user_id="u6", role="operator")

    async def get(path: str, key: str | None, status: int) -> None:
        headers = {"X-API-Key": key} if key else {}
        response = await h.client.get(path, headers=headers)
        assert response.status == status, (path, key, await response.text())

    await get("/x", "good-key-1", 200)  # miss, tower valid, minted
    await get("/x", "good-key-1", 200)  # hit, reused
    await get("/x", "bad-key", 401)  # miss, tower invalid
    await get("/x", "bad-key", 401)  # negative hit
    await get("/x", None, 401)  # no key: no lookup
    await get("/admin/x", "good-key-1", 403)  # hit, missing capability
    await get("/x", "limited-key", 200)  # miss, tower valid, minted
    await get("/x", "limited-key", 200)  # hit, reused
    await get("/x", "limited-key", 429)  # hit, rate limited
    await get("/x", "third-key", 200)  # miss, minted; the cache holds 2: good-key-1 evicted
    now[0] += 20  # past the TTL, within stale_if_error
    tower.mode = "error500"
    await get("/x", "third-key", 200)  # miss, tower fault, stale serve, reused
    await get("/x", "unseen-key", 503)  # miss, tower fault, nothing stale
    tower.mode, tower.delay = "ok", 0.3
    # One tower call for three concurrent misses: two waiters; one mint, two reuses.
    await asyncio.gather(*(get("/x", "flight-key", 200) for _ in range(3)))

    text = await h.metrics()
    expected = {
        ("tower_gateway_cache_hits_total", ()): 5,
        ("tower_gateway_cache_misses_total", ()): 9,
        ("tower_gateway_cache_negative_hits_total", ()): 1,
        ("tower_gateway_cache_stale_serves_total", ()): 1,
        ("tower_gateway_cache_evictions_total", ()): 2,  # good-key-1, then limited-key
        ("tower_gateway_single_flight_waiters_total", ()): 2,
        ("tower_gateway_cache_entries", (("kind", "positive"),)): 2,
        ("tower_gateway_cache_entries", (("kind", "negative"),)): 1,
        ("tower_gateway_tower_requests_total", (("outcome", "valid"),)): 4,
        ("tower_gateway_tower_requests_total", (("outcome", "invalid_key"),)): 1,
        ("tower_gateway_tower_requests_total", (("outcome", "server_error"),)): 2,
        ("tower_gateway_tower_request_seconds_count", (("outcome", "valid"),)): 4,
        ("tower_gateway_tower_request_seconds_count", (("outcome", "server_error"),)): 2,
        ("tower_gateway_auth_total", (("outcome", "success"),)): 9,
        ("tower_gateway_auth_total", (("outcome", "invalid_key"),)): 2,
        ("tower_gateway_auth_total", (("outcome", "missing_key"),)): 1,
        ("tower_gateway_auth_total", (("outcome", "missing_capability"),)): 1,
        ("tower_gateway_auth_total", (("outcome", "rate_limited"),)): 1,
        ("tower_gateway_auth_total", (("outcome", "tower_unavailable"),)): 1,
        ("tower_gateway_requests_total", (("route", "root"), ("status", "200"))): 9,
        ("tower_gateway_requests_total", (("route", "root"), ("status", "401"))): 3,
        ("tower_gateway_requests_total", (("route", "root"), ("status", "429"))): 1,
        ("tower_gateway_requests_total", (("route", "root"), ("status", "503"))): 1,
        ("tower_gateway_requests_total", (("route", "admin"), ("status", "403"))): 1,
        ("tower_gateway_upstream_response_seconds_count", (("route", "root"),)): 9,
        ("tower_gateway_jwt_tokens_total", (("origin", "minted"),)): 4,
        ("tower_gateway_jwt_tokens_total", (("origin", "reused"),)): 5,
        ("tower_gateway_rate_limited_total", ()): 1,
        ("tower_gateway_requests_in_flight", ()): 0,
        ("tower_gateway_tower_circuit_state", ()): 0,
        ("tower_gateway_config_reloads_total", (("outcome", "success"),)): 0,
        ("tower_gateway_config_reloads_total", (("outcome", "failure"),)): 0,
        ("tower_gateway_config_last_reload_successful", ()): 1,
        ("tower_gateway_config_restart_pending", ()): 0,
        ("tower_gateway_log_lines_dropped_total", (("log", "access"),)): 0,
        ("tower_gateway_log_lines_dropped_total", (("log", "audit"),)): 0,
    }
    actual = {key: sample(text, key[0], **dict(key[1])) for key in expected}
    assert actual == expected
    assert sample(text, "tower_gateway_cache_hit_ratio") == 5 / 14
    assert sample(text, "tower_gateway_upstream_response_seconds_count", route="admin") is None
    assert "tower_gateway_would_deny_total{" not in text  # nothing shadowed
    last = sample(text, "tower_gateway_config_last_reload_success_timestamp_seconds")
    assert last is not None and abs(last - time.time()) < 60
    build = next(
        f for f in text_string_to_metric_families(text) if f.name == "tower_gateway_build_info"
    )
    assert build.samples[0].labels["version"] == __version__

    # Labels are bounded: no key, user or path ever becomes one.
    for forbidden in ("good-key-1", "bad-key", "limited-key", "flight-key", "u1", "/admin/x"):
        assert forbidden not in text


async def test_every_documented_family_is_exported(make_gateway: GatewayFactory) -> None:
    h = await make_gateway()
    names = {f.name for f in text_string_to_metric_families(await h.metrics())}
    assert [name for name in FAMILIES if name not in names] == []
