"""gateway.yaml: expansion, validation with the dotted key path, and `check-config`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, load_config, parse_config
from gateway.errors import ConfigError
from tests.conftest import ENV, JWT_SECRET, TOWER_API_KEY, TOWER_SECRET

REPO = Path(__file__).resolve().parent.parent


def parse(data: Any, env: dict[str, str] | None = None) -> Config:
    return parse_config(data, env=ENV if env is None else env)


def error_of(data: Any, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(data, env)
    return info.value


# --------------------------------------------------------------------------- defaults


def test_defaults_match_the_contract() -> None:
    cfg = parse({})
    assert (cfg.server.host, cfg.server.port, cfg.server.max_body_size) == ("127.0.0.1", 8080, None)
    assert (cfg.ops.host, cfg.ops.port) == ("127.0.0.1", 9091)
    assert cfg.tower.url == "http://127.0.0.1:9999"
    assert cfg.tower.timeout == 2.0 and cfg.tower.local is None
    assert (cfg.cache.ttl, cfg.cache.negative_ttl) == (300, 30)
    assert (cfg.cache.max_entries, cfg.cache.stale_if_error) == (100_000, 300)
    assert cfg.credentials.sources == ("x-api-key", "authorization")
    assert dict(cfg.roles) == {
        n: n for n in ("admin", "operator", "observer", "node", "api_client")
    }
    assert dict(cfg.capabilities.roles) == {"admin": ("*",)}
    assert dict(cfg.capabilities.scopes) == {"admin:full": ("*",), "tools:execute": ("execute:*",)}
    assert cfg.capabilities.keep_scopes is True
    (route,) = cfg.routes
    assert (route.path, route.upstream, route.methods, route.require) == (
        "/",
        "http://127.0.0.1:9000",
        None,
        (),
    )
    assert (route.auth, route.websocket, route.timeout) == (True, True, 30)
    assert (cfg.jwt.header, cfg.jwt.algorithm, cfg.jwt.issuer, cfg.jwt.audience, cfg.jwt.ttl) == (
        "Authorization",
        "HS256",
        "tower-gateway",
        "internal",
        300,
    )
    assert (cfg.rate_limit.default_per_minute, cfg.rate_limit.backend) == (100, "memory")
    assert cfg.redis.url is None
    assert (cfg.websocket.auth_timeout, cfg.websocket.allowed_origins) == (10, None)
    # Secrets come from the environment when the file does not name them.
    assert cfg.tower.api_key == TOWER_API_KEY and cfg.tower.secret == TOWER_SECRET
    assert cfg.jwt.secret == JWT_SECRET
    assert cfg.admin.token == ENV["GATEWAY_ADMIN_TOKEN"]


# --------------------------------------------------------------------------- expansion


def test_env_references_are_expanded_anywhere() -> None:
    env = {
        **ENV,
        "TOWER_HOST": "tower.internal",
        "UP": "http://10.0.0.7:81",
        "PORT": "8181",
        "KEEP": "false",
        "TTL": "12.5",
    }
    cfg = parse(
        {
            "server": {"port": "${PORT}"},
            "tower": {"url": "https://${TOWER_HOST}:8443", "api_key": "${TOWER_API_KEY}"},
            "cache": {"ttl": "${TTL}"},
            "capabilities": {"keep_scopes": "${KEEP}"},
            "routes": [{"path": "/", "upstream": "${UP}", "require": ["x:${TOWER_HOST}"]}],
        },
        env,
    )
    assert cfg.server.port == 8181
    assert cfg.tower.url == "https://tower.internal:8443"
    assert cfg.tower.api_key == TOWER_API_KEY
    assert cfg.cache.ttl == 12.5
    assert cfg.capabilities.keep_scopes is False
    assert cfg.routes[0].upstream == "http://10.0.0.7:81"
    assert cfg.routes[0].require == ("x:tower.internal",)


def test_env_default_is_used_when_unset_or_empty() -> None:
    data = {
        "tower": {"url": "${TOWER_URL:-http://tower.example:9999}"},
        "server": {"host": "${HOST:-0.0.0.0}"},
    }
    cfg = parse(data)
    assert cfg.tower.url == "http://tower.example:9999"
    assert cfg.server.host == "0.0.0.0"
    cfg = parse(data, {**ENV, "TOWER_URL": "", "HOST": "10.1.2.3"})
    assert cfg.tower.url == "http://tower.example:9999"
    assert cfg.server.host == "10.1.2.3"
    cfg = parse(data, {**ENV, "TOWER_URL": "http://set.example"})
    assert cfg.tower.url == "http://set.example"


def test_unset_variable_names_the_variable_and_the_key() -> None:
    exc = error_of(
        {
            "routes": [
                {"path": "/", "upstream": "http://a"},
                {"path": "/b", "upstream": "${B_UPSTREAM}"},
            ]
        }
    )
    assert exc.path == "routes[1].upstream"
    assert "B_UPSTREAM" in str(exc) and str(exc).startswith("routes[1].upstream: ")

    exc = error_of({"tower": {"secret": "${NOT_SET_ANYWHERE}"}})
    assert exc.path == "tower.secret" and "NOT_SET_ANYWHERE" in str(exc)


def test_expanded_number_that_is_not_a_number_is_an_error() -> None:
    exc = error_of({"server": {"port": "${PORT}"}}, {**ENV, "PORT": "eighty"})
    assert exc.path == "server.port"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        ({"cache": {"tll": 5}}, "cache.tll", "unknown key"),
        ({"surprise": {}}, "surprise", "unknown key"),
        (
            {"routes": [{"path": "/", "upstream": "http://a", "auht": False}]},
            "routes[0].auht",
            "unknown key",
        ),
        ({"cache": {"ttl": "soon"}}, "cache.ttl", "number"),
        ({"server": {"port": True}}, "server.port", "integer"),
        ({"server": {"port": 80.5}}, "server.port", "integer"),
        ({"server": {"port": 70000}}, "server.port", "port"),
        ({"cache": {"max_entries": 0}}, "cache.max_entries", "greater than 0"),
        ({"cache": {"negative_ttl": -1}}, "cache.negative_ttl", "negative"),
        ({"capabilities": {"keep_scopes": "yes"}}, "capabilities.keep_scopes", "true or false"),
        ({"credentials": {"sources": ["x-api-key", "query"]}}, "credentials.sources", "x-api-key"),
        ({"credentials": {"sources": "x-api-key"}}, "credentials.sources", "list"),
        ({"routes": {"path": "/"}}, "routes", "list"),
        (
            {
                "routes": [
                    {"path": "/", "upstream": "http://a"},
                    {"path": "/b", "upstream": "ftp://b"},
                ]
            },
            "routes[1].upstream",
            "not a URL",
        ),
        (
            {"routes": [{"path": "/", "upstream": "http://a"}, {"path": "/b", "upstream": "b:80"}]},
            "routes[1].upstream",
            "not a URL",
        ),
        (
            {
                "routes": [
                    {"path": "/", "upstream": "http://a"},
                    {"path": "/b", "upstream": "http://"},
                ]
            },
            "routes[1].upstream",
            "not a URL",
        ),
        ({"routes": [{"path": "/", "upstream": "http://a:99999"}]}, "routes[0].upstream", "port"),
        ({"routes": [{"path": "/"}]}, "routes[0].upstream", "required"),
        ({"routes": [{"path": "api", "upstream": "http://a"}]}, "routes[0].path", "/"),
        ({"routes": [{"path": "/a/../b", "upstream": "http://a"}]}, "routes[0].path", "normalised"),
        (
            {"routes": [{"path": "/", "upstream": "http://a", "methods": ["get"]}]},
            "routes[0].methods",
            "upper-case",
        ),
        (
            {"routes": [{"path": "/", "upstream": "http://a", "timeout": 0}]},
            "routes[0].timeout",
            "greater than 0",
        ),
        ({"routes": []}, "routes", "at least one"),
        ({"tower": {"url": "tower:9999"}}, "tower.url", "not a URL"),
        ({"tower": {"url": "http://u:p@tower"}}, "tower.url", "credentials"),
        ({"jwt": {"algorithm": "none"}}, "jwt.algorithm", "HS256"),
        ({"jwt": {"ttl": 1}}, "jwt.ttl", "at least"),
        ({"jwt": {"header": "X Bad"}}, "jwt.header", "header"),
        ({"rate_limit": {"backend": "redis"}}, "rate_limit.backend", "redis.url"),
        ({"redis": {"url": "http://redis"}}, "redis.url", "redis://"),
        ({"redis": {"max_connections": 1}}, "redis.max_connections", "at least 2"),
        ({"redis": {"pool_timeout": 0}}, "redis.pool_timeout", "greater than 0"),
        ({"rate_limit": {"mode": "eventual"}}, "rate_limit.mode", "exact"),
        ({"rate_limit": {"sync_interval": 0}}, "rate_limit.sync_interval", "greater than 0"),
        ({"admin": {"token": "short"}}, "admin.token", "16"),
        ({"capabilities": {"roles": {"admin": "*"}}}, "capabilities.roles.admin", "list"),
    ],
)
def test_bad_values_are_rejected_with_the_dotted_path(data: Any, path: str, words: str) -> None:
    exc = error_of(data)
    assert exc.path == path
    assert str(exc).startswith(f"{path}: ")
    assert words in exc.message


def test_bad_url_message_reads_as_documented() -> None:
    exc = error_of(
        {"routes": [{"path": "/", "upstream": "http://a"}, {"path": "/b", "upstream": "nope"}]}
    )
    assert str(exc).startswith("routes[1].upstream: not a URL")


@pytest.mark.parametrize(
    ("missing", "path"),
    [
        ("TOWER_API_KEY", "tower.api_key"),
        ("TOWER_SECRET", "tower.secret"),
        ("GATEWAY_JWT_SECRET", "jwt.secret"),
    ],
)
def test_missing_secrets_are_rejected(missing: str, path: str) -> None:
    env = {k: v for k, v in ENV.items() if k != missing}
    exc = error_of({}, env)
    assert exc.path == path
    assert missing in exc.message  # says where it may come from


def test_short_jwt_secret_is_rejected() -> None:
    exc = error_of({}, {**ENV, "GATEWAY_JWT_SECRET": "x" * 31})
    assert exc.path == "jwt.secret" and "32" in exc.message
    assert parse({}, {**ENV, "GATEWAY_JWT_SECRET": "x" * 32}).jwt.secret == "x" * 32


def test_asymmetric_algorithm_needs_a_key_file(tmp_path: Path) -> None:
    exc = error_of({"jwt": {"algorithm": "RS256"}})
    assert exc.path == "jwt.private_key_file"
    exc = error_of(
        {"jwt": {"algorithm": "ES256", "private_key_file": str(tmp_path / "absent.pem")}}
    )
    assert exc.path == "jwt.private_key_file" and "no such file" in exc.message


def test_duplicate_route_names_are_rejected() -> None:
    exc = error_of(
        {
            "routes": [
                {"path": "/a", "upstream": "http://a"},
                {"path": "/b", "upstream": "http://a", "name": "a"},
            ]
        }
    )
    assert exc.path == "routes[1].name"


def test_route_names_are_derived_from_paths() -> None:
    cfg = parse(
        {
            "routes": [
                {"path": "/api/v1", "upstream": "http://a"},
                {"path": "/", "upstream": "http://a"},
            ]
        }
    )
    assert [r.name for r in cfg.routes] == ["api_v1", "root"]


def test_load_config_reads_yaml_and_reports_yaml_errors(tmp_path: Path) -> None:
    good = tmp_path / "gw.yaml"
    good.write_text("routes:\n  - path: /api\n    upstream: ${UP:-http://127.0.0.1:7000}\n")
    cfg = load_config(good, env=ENV)
    assert cfg.routes[0].upstream == "http://127.0.0.1:7000"
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, env=ENV)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", env=ENV)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top, env=ENV)


# --------------------------------------------------------------------------- check-config


def check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ENV}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_check_config_ok_prints_one_line(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "tower:\n  url: ${TOWER_URL}\n"
        "routes:\n  - path: /api\n    upstream: http://127.0.0.1:7000\n"
        "  - path: /\n    upstream: http://127.0.0.1:7001\n"
    )
    result = check_config(config, {**ENV, "TOWER_URL": "http://127.0.0.1:9999"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "2 route" in lines[0]
    for secret in (JWT_SECRET, TOWER_API_KEY, TOWER_SECRET):
        assert secret not in result.stdout + result.stderr


def test_check_config_bad_names_the_key_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "routes:\n  - path: /api\n    upstream: http://127.0.0.1:7000\n"
        "  - path: /\n    upstream: not-a-url\n"
    )
    result = check_config(config, ENV)
    assert result.returncode == 2
    assert "routes[1].upstream" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_check_config_unset_variable_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("tower:\n  url: ${TOWER_URL}\n")
    result = check_config(config, ENV)
    assert result.returncode == 2
    assert "tower.url" in result.stderr and "TOWER_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_bad_key_file_exits_2(tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    config = tmp_path / "gateway.yaml"
    config.write_text(f"jwt:\n  algorithm: RS256\n  private_key_file: {pem}\n")
    result = check_config(config, ENV)
    assert result.returncode == 2
    assert "jwt.private_key_file" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_missing_file_exits_2(tmp_path: Path) -> None:
    result = check_config(tmp_path / "nope.yaml", ENV)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "nope.yaml" in result.stderr


def test_env_reference_in_flow_style_and_special_characters(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        "admin: {token: ${ADMIN}}\n"
        "tower: {url: 'http://127.0.0.1:9999', secret: ${SECRET}}  # ${IN_A_COMMENT}\n"
    )
    env = {**ENV, "ADMIN": "tok: #{with} [yaml] chars", "SECRET": "s'e\"c: r#e}t"}
    cfg = load_config(config, env=env)
    assert cfg.admin.token == "tok: #{with} [yaml] chars"
    assert cfg.tower.secret == "s'e\"c: r#e}t"
