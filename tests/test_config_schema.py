"""`tower-gateway config schema`: the JSON Schema of gateway.yaml, committed and shipped.

The committed `config/gateway.schema.json` must be what the command prints (so it
cannot drift from the dataclasses), the shipped configs must name it in their
yaml-language-server modeline and validate against it, and the schema must
refuse what `load_config` refuses key by key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway import config as cfg
from gateway.cli.main import main
from gateway.config import schema
from gateway.config.jsonschema import SCHEMA_FILE, SchemaError, _section, config_schema
from gateway.errors import ConfigError
from tests.conftest import ENV

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("gateway.yaml", "gateway/default.yaml", "config/remote-tower.yaml")
MODELINE = "# yaml-language-server: $schema="


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((ROOT / SCHEMA_FILE).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_committed_schema_is_what_the_command_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config", "schema"]) == 0
    printed = capsys.readouterr().out
    committed = (ROOT / SCHEMA_FILE).read_text()
    assert printed == committed, "regenerate: tower-gateway config schema > " + SCHEMA_FILE
    assert json.loads(printed)["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_name_the_schema_and_validate(
    name: str, validator: jsonschema.Draft202012Validator
) -> None:
    path = ROOT / name
    first = path.read_text().splitlines()[0]
    assert first.startswith(MODELINE)
    target = first.removeprefix(MODELINE)
    if name != "gateway/default.yaml":  # packaged copy of gateway.yaml: the path is the root's
        assert (path.parent / target).resolve() == ROOT / SCHEMA_FILE
    # yaml.safe_load, as an editor reads it: `${VAR}` must sit where plain YAML allows it.
    data = yaml.safe_load(path.read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]
    assert errors == []


def test_every_section_and_key_is_in_the_schema() -> None:
    schema = config_schema()
    sections = {f.name for f in fields(cfg.Config) if not f.metadata.get("internal")}
    assert set(schema["properties"]) == sections
    assert schema["additionalProperties"] is False
    route = schema["$defs"]["RouteConfig"]
    assert set(route["properties"]) == {f.name for f in fields(cfg.RouteConfig)}
    assert route["required"] == ["path"]  # and `upstream` unless decision-only (below)
    assert schema["else"]["properties"]["routes"]["items"]["required"] == ["upstream"]
    assert schema["$defs"]["LocalTowerConfig"]["required"] == ["db"]
    assert all(
        d.get("additionalProperties") is False for n, d in schema["$defs"].items() if n != "env_ref"
    )


REFUSED: list[dict[str, Any]] = [
    {"serverx": {}},
    {"server": {"port": 70000}},
    {"server": {"port": "8080"}},  # a quoted number is a string, not `${VAR}`
    {"server": {"hots": "0.0.0.0"}},
    {"cache": {"ttl": -1}},
    {"cache": {"max_entries": 0}},
    {"jwt": {"algorithm": "none"}},
    {"jwt": {"ttl": 5}},
    {"jwt": {"header": "X Bad"}},
    {"rate_limit": {"backend": "disk"}},
    {"log": {"level": "TRACE"}},
    {"credentials": {"sources": []}},
    {"credentials": {"sources": ["x-api-key", "x-api-key"]}},
    {"credentials": {"sources": ["cookie"]}},
    {"routes": [{"path": "/a//b", "upstream": "http://127.0.0.1:9000"}]},
    {"routes": [{"path": "/a/../b", "upstream": "http://127.0.0.1:9000"}]},
    {"routes": [{"path": "relative", "upstream": "http://127.0.0.1:9000"}]},
    {"routes": [{"path": "/", "upstream": "ftp://127.0.0.1"}]},
    {"routes": [{"path": "/"}]},
    {"routes": [{"path": "/", "upstream": "http://x", "methods": ["get"]}]},
    {"tower": {"local": {}}},
    {"tower": {"local": {"db": "x.db", "prefix": "Tk"}}},
    {"redis": {"url": "http://127.0.0.1:6379"}},
    {"websocket": {"auth_timeout": True}},
    {"capabilities": {"keep_scopes": "yes"}},
    {"server": {"enabled": False}},
    {"server": {"enabled": False}, "decision": {"token": "short"}},
]


@pytest.mark.parametrize("doc", REFUSED, ids=lambda d: json.dumps(d)[:60])
def test_the_schema_refuses_what_load_config_refuses(
    doc: dict[str, Any], validator: jsonschema.Draft202012Validator
) -> None:
    with pytest.raises(ConfigError):
        cfg.parse_config(doc, env=ENV)
    assert list(validator.iter_errors(doc)), "the schema accepts a config check-config refuses"


ACCEPTED: list[dict[str, Any]] = [
    {},
    {"server": {"port": "${PORT:-8080}", "shutdown_timeout": 0}},
    {"websocket": {"auth_timeout": "${WS_AUTH_TIMEOUT:-2.5}"}},
    {"capabilities": {"keep_scopes": "${KEEP:-false}"}},
    {"rate_limit": {"backend": "${BACKEND:-memory}"}},
    {"routes": [{"path": "/api", "upstream": "http://[::1]:9000/base", "methods": ["GET"]}]},
    {"server": {"trusted_proxies": ["10.0.0.0/8", "::1"]}},
    {"tower": {"local": {"db": "x.db"}}},
    {"server": {"enabled": False}, "decision": {"cache_ttl": 5}, "routes": [{"path": "/"}]},
]


@pytest.mark.parametrize("doc", ACCEPTED, ids=lambda d: json.dumps(d)[:60])
def test_the_schema_accepts_what_load_config_accepts(
    doc: dict[str, Any], validator: jsonschema.Draft202012Validator
) -> None:
    cfg.parse_config(doc, env=ENV)
    assert list(validator.iter_errors(doc)) == []


def test_enums_agree_with_their_checks() -> None:
    schema = config_schema()
    seen = 0
    for section in (cfg.JwtConfig, cfg.RateLimitConfig, cfg.LogConfig):
        props = schema["$defs"][section.__name__]["properties"]
        for f in fields(section):
            plain = props[f.name].get("anyOf", [props[f.name]])[0]
            if "enum" not in plain:
                continue
            seen += 1
            check = f.metadata["check"]
            assert all(check(v) is None for v in plain["enum"])
            assert check("not-one-of-them") is not None
    assert seen == 4  # jwt.algorithm, rate_limit.backend and .mode, log.level


def test_a_check_without_a_schema_rule_stops_the_generator() -> None:
    @dataclass(frozen=True, slots=True)
    class Odd:
        size: int = schema._check(lambda v: None if v % 2 else "must be odd", 1)

    with pytest.raises(SchemaError, match=r"Odd\.size"):
        _section(Odd, {})
