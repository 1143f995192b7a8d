"""Decision mode as operators run it: config keys, `serve` with the decision listener
(decision-only too), `explain`, and the Envoy and Traefik configurations."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.cli.main import main
from gateway.config import parse_config, summary
from gateway.decision.dataplane import envoy, traefik
from gateway.decision.dataplane.common import make_plan
from gateway.decision.listener import TOKEN_HEADER
from gateway.errors import ConfigError
from tests.conftest import ADMIN_TOKEN, ENV, FakeTower
from tests.decision.conftest import DECISION_TOKEN, DecisionFactory, free_port


def base(**extra: Any) -> dict[str, Any]:
    return {
        "tower": {"url": "http://127.0.0.1:9"},
        "routes": [{"path": "/public", "auth": False}, {"path": "/"}],
        **extra,
    }


def test_decision_only_config_needs_no_upstream() -> None:
    config = parse_config(base(server={"enabled": False}, decision={"cache_ttl": 5}), env=ENV)
    assert config.decision is not None and config.decision.cache_ttl == 5
    assert not config.server.enabled
    assert "listen off, decision 127.0.0.1:9092," in summary(config)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (base(), "routes[0].upstream"),
        (base(server={"enabled": False}), "server.enabled"),
        (base(server={"enabled": False}, decision={"cache_ttl": -1}), "decision.cache_ttl"),
        (base(server={"enabled": False}, decision={"token": "short"}), "decision.token"),
        (base(server={"enabled": False}, decision={"allow_from": ["x"]}), "decision.allow_from"),
        (base(server={"enabled": False}, decision={"port": 70000}), "decision.port"),
        (base(server={"enabled": False}, decision={"bogus": 1}), "decision.bogus"),
    ],
)
def test_bad_decision_config_names_the_key(data: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(data, env=ENV)
    assert error.value.path == path


def write_config(tmp_path: Path, tower_url: str, port: int, **extra: Any) -> Path:
    data = base(**extra)
    data["tower"] = {"url": tower_url}
    data["ops"] = {"port": free_port()}
    data["log"] = {"access": False, "audit": None}
    data["decision"] = {"port": port, "token": DECISION_TOKEN, **data.get("decision", {})}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_decision_only_answers_and_stops_on_sigterm(
    tmp_path: Path, fake_tower: FakeTower, workers: int
) -> None:
    fake_tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    port = free_port()
    path = write_config(tmp_path, fake_tower.url, port, server={"enabled": False})
    ops_port = yaml.safe_load(path.read_text())["ops"]["port"]
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
    with (tmp_path / "stderr.log").open("wb") as log:
        process = subprocess.Popen(
            [*argv, "--workers", str(workers)],
            env={**os.environ, **ENV},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        headers = {
            TOKEN_HEADER: DECISION_TOKEN,
            "X-Original-Method": "GET",
            "X-Original-URI": "/x",
            "X-API-Key": "good-key-1",
        }
        async with aiohttp.ClientSession() as session:
            for _ in range(1200):  # workers start slowly on a loaded machine
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"http://127.0.0.1:{port}/auth", headers=headers) as r:
                        assert r.status == 200
                        assert r.headers["Authorization"].startswith("Bearer ")
                        break
                assert process.poll() is None, (tmp_path / "stderr.log").read_text()
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the decision listener did not answer")
            text = ""
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"http://127.0.0.1:{ops_port}/metrics") as r:
                        text = await r.text()
                if "tower_gateway_decisions_total{" in text and 'outcome="allow"' in text:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"no decision counted on the ops listener:\n{text[-2000:]}")
        os.kill(process.pid, signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


async def test_explain_reports_the_decision_listeners_answer(
    make_decision: DecisionFactory,
) -> None:
    h = await make_decision(decision={"cache_ttl": 7})
    response = await h.ops.post(
        "/admin/explain",
        json={"key": "good-key-1", "method": "GET", "path": "/tools/x"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    answer = await response.json()
    assert answer["decision_mode"]["status"] == 200
    assert answer["decision_mode"]["cache_control"] == "private, max-age=7"
    denied = await h.ops.post(
        "/admin/explain",
        json={"key": "good-key-1", "method": "GET", "path": "/admin/x"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert (await denied.json())["decision_mode"]["cache_control"] == "no-store"


def plan_for(**decision: Any) -> Any:
    config = parse_config(
        base(
            server={"enabled": False},
            decision={"port": 9092, **decision},
            jwt={"header": "X-Internal-Token"},
        ),
        env=ENV,
    )
    return make_plan(config, "http://10.0.0.5:8000", "0.0.0.0:8443")


def test_envoy_bootstrap_structure() -> None:
    text = envoy.render(plan_for(token=DECISION_TOKEN))
    doc = yaml.safe_load(text)
    listener = doc["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8443}
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["@type"].endswith("HttpConnectionManager")
    assert hcm["upgrade_configs"] == [{"upgrade_type": "websocket"}]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    removed = {
        m["remove"]
        for m in hcm["http_filters"][0]["typed_config"]["mutations"]["request_mutations"]
    }
    assert {"x-internal-token", "x-user-id", "x-internal-jwt"} <= removed
    assert "x-api-key" not in removed  # the decision reads it
    authz = hcm["http_filters"][1]["typed_config"]
    assert authz["failure_mode_allow"] is False
    service = authz["http_service"]
    assert service["path_prefix"] == "/ext_authz"
    assert service["server_uri"]["cluster"] == "tower_gateway_decision"
    assert service["authorization_request"]["headers_to_add"] == [
        {"key": TOKEN_HEADER, "value": DECISION_TOKEN}
    ]
    upstream = [
        p["exact"]
        for p in service["authorization_response"]["allowed_upstream_headers"]["patterns"]
    ]
    assert upstream == ["x-internal-token", "x-request-id"]
    client = [
        p["exact"] for p in service["authorization_response"]["allowed_client_headers"]["patterns"]
    ]
    assert {"www-authenticate", "retry-after", "x-request-id"} <= set(client)
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    public, root = routes
    assert public["match"] == {"path_separated_prefix": "/public"}
    assert set(public["request_headers_to_remove"]) >= {
        "x-api-key",
        "authorization",
        "x-internal-token",
    }
    assert root["match"] == {"prefix": "/"}
    assert "x-internal-token" not in root["request_headers_to_remove"]
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    assert set(clusters) == {"tower_gateway_decision", "upstream"}


def test_traefik_dynamic_configuration_structure() -> None:
    doc = yaml.safe_load(traefik.render(plan_for(token=DECISION_TOKEN)))
    http = doc["http"]
    router = http["routers"]["tower-gateway"]
    assert router["middlewares"] == [
        "tower-gateway-scrub",
        "tower-gateway-decision",
        "tower-gateway-strip-key",
    ]
    middlewares = http["middlewares"]
    forward = middlewares["tower-gateway-decision"]["forwardAuth"]
    assert forward["address"] == "http://127.0.0.1:9092/auth"
    assert forward["trustForwardHeader"] is False
    assert forward["authResponseHeaders"] == ["X-Internal-Token", "X-Request-Id"]
    scrub = middlewares["tower-gateway-scrub"]["headers"]["customRequestHeaders"]
    assert scrub[TOKEN_HEADER] == DECISION_TOKEN
    assert scrub["X-Internal-Token"] == "" and scrub["X-User-Id"] == ""
    assert "X-API-Key" not in scrub
    strip = middlewares["tower-gateway-strip-key"]["headers"]["customRequestHeaders"]
    assert strip == {"X-API-Key": "", "Authorization": "", TOKEN_HEADER: ""}
    servers = http["services"]["tower-gateway-upstream"]["loadBalancer"]["servers"]
    assert servers == [{"url": "http://10.0.0.5:8000"}]


def test_dataplane_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(base(server={"enabled": False}, decision={})))
    env = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        for proxy in ("nginx", "caddy", "envoy", "traefik"):
            code = main(
                [
                    "dataplane",
                    proxy,
                    "--config",
                    str(path),
                    "--upstream",
                    "http://127.0.0.1:9000",
                    "--listen",
                    "127.0.0.1:8080",
                ]
            )
            assert code == 0
            assert "127.0.0.1:9092" in capsys.readouterr().out
        bad = main(
            [
                "dataplane",
                "nginx",
                "--config",
                str(path),
                "--upstream",
                "ftp://x",
                "--listen",
                "127.0.0.1:8080",
            ]
        )
        assert bad == 2
        assert "--upstream" in capsys.readouterr().err
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_reload_applies_decision_token_and_ttl_and_asks_a_restart_for_the_rest() -> None:
    from gateway.ops.reload import merge

    running = parse_config(
        base(server={"enabled": False}, decision={"cache_ttl": 1, "token": DECISION_TOKEN}),
        env=ENV,
    )
    loaded = parse_config(
        base(
            server={"enabled": False},
            decision={"cache_ttl": 5, "token": "another-token-0123456789", "port": 9999},
        ),
        env=ENV,
    )
    merged, changed, restart = merge(running, loaded)
    assert merged.decision is not None
    assert merged.decision.cache_ttl == 5 and merged.decision.token == "another-token-0123456789"
    assert merged.decision.port == 9092
    assert set(changed) == {"decision.cache_ttl", "decision.token"}
    assert restart == ("decision.port",)
    # A decision listener added to a running gateway: named, kept off, no crash.
    plain = parse_config(base(routes=[{"path": "/", "upstream": "http://127.0.0.1:9"}]), env=ENV)
    with_decision = parse_config(
        base(routes=[{"path": "/", "upstream": "http://127.0.0.1:9"}], decision={}), env=ENV
    )
    merged, _, restart = merge(plain, with_decision)
    assert merged.decision is None and restart == ("decision",)


def test_explain_cli_prints_the_decision_row() -> None:
    from gateway.cli.explain import report

    text = report(
        {
            "decision": "allow",
            "method": "GET",
            "path": "/x",
            "status": 200,
            "reason": "allowed",
            "detail": "allowed",
            "decision_mode": {
                "listener": "127.0.0.1:9092",
                "status": 200,
                "cache_control": "private, max-age=5",
            },
        }
    )
    assert "decision     200 on 127.0.0.1:9092, private, max-age=5" in text
