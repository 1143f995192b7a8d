"""gateway.yaml as frozen, typed sections; `load_config` validates and names the bad key.

The schema is `gateway.config.schema`'s dataclasses: field names are the YAML
keys, field types are checked (unknown keys are errors), and
`field(metadata={"check": ...})` adds value rules. `${VAR}` and
`${VAR:-default}` are expanded in every string value after parsing
(`gateway.config.expand`), so secrets never have to be YAML-safe; rules across
keys are `gateway.config.rules`. The sections are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from gateway.config.expand import (
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_VALUES,
    _build,
    _check_shape,
    _expand,
    _protect,
    _Refs,
)
from gateway.config.rules import DEFAULT_DATA_DIR, LOG_STREAMS, _finish, _finish_tower, _replace
from gateway.config.schema import (
    CREDENTIAL_SOURCES,
    INTENT_HEADERS,
    JWT_ALGORITHMS,
    MIN_FINGERPRINT_SECRET,
    MIN_HMAC_SECRET,
    AdminConfig,
    CacheConfig,
    CapabilitiesConfig,
    Config,
    CredentialsConfig,
    DecisionConfig,
    JwtConfig,
    KeyFormatConfig,
    LocalTowerConfig,
    LogConfig,
    OpsConfig,
    RateLimitConfig,
    RedisConfig,
    RouteConfig,
    ServerConfig,
    TowerConfig,
    TracingConfig,
    WebSocketConfig,
)
from gateway.errors import ConfigError

# --------------------------------------------------------------------------- entry points


def parse_config(
    data: Any,
    *,
    env: Mapping[str, str] | None = None,
    base: Path | None = None,
    source: str = "<dict>",
    refs: _Refs | None = None,
) -> Config:
    """Build a `Config` from already-parsed YAML (tests use plain dicts)."""
    env = os.environ if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", "the top level must be a mapping")
    _check_shape(data)
    expanded = _expand(data, "", env, refs)
    cfg = _build(Config, expanded, "")
    cfg = _finish(cfg, env, base or Path.cwd())
    return _replace(cfg, source=source)


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML file; raises `ConfigError` naming the offending key."""
    p = Path(path)
    return parse_config_text(_read(p), env=env, base=p.resolve().parent, source=str(p))


def _read(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{p} is not UTF-8 text") from None


def parse_config_text(
    text: str,
    *,
    env: Mapping[str, str] | None = None,
    base: Path | None = None,
    source: str = "<text>",
) -> Config:
    """Parse YAML text (with `${VAR}` anywhere) into a validated `Config`."""
    data, refs = _parse_yaml(text, source)
    return parse_config(data, env=env, base=base, source=source, refs=refs)


def _parse_yaml(text: str, source: str) -> tuple[Any, _Refs | None]:
    protected, refs = _protect(text)
    try:
        data = yaml.safe_load(protected)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("", f"{source} is not valid YAML{where}") from None
    except ValueError:  # a scalar YAML resolves but cannot build: `2001-02-30`
        raise ConfigError("", f"{source} has a value YAML cannot read (a date?)") from None
    except RecursionError:
        raise ConfigError("", f"{source} is nested too deeply") from None
    return data, refs


def load_sections(
    path: str | os.PathLike[str], names: tuple[str, ...], *, env: Mapping[str, str] | None = None
) -> Config:
    """Only the named top-level sections of a config file, read and checked as `load_config`
    reads them (`${VAR}` expanded, the tower section's rules applied); every other section
    keeps its default, neither expanded nor checked, so a command that manages keys needs no
    JWT secret. Unknown top-level keys are still errors."""
    p = Path(path)
    data, refs = _parse_yaml(_read(p), str(p))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", "the top level must be a mapping")
    _check_shape(data)
    env = os.environ if env is None else env
    known = {f.name for f in fields(Config) if not f.metadata.get("internal")}
    for key in data:
        if key not in known:
            raise ConfigError(str(key), "unknown key")
    picked = {name: data[name] for name in names if name in data}
    cfg = _build(Config, _expand(picked, "", env, refs), "")
    if "tower" in names:
        cfg = _replace(cfg, tower=_finish_tower(cfg.tower, env, p.resolve().parent))
    return _replace(cfg, source=str(p))


def default_config_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("TOWER_GATEWAY_CONFIG") or "gateway.yaml"


def summary(cfg: Config) -> str:
    tower = f"local tower {cfg.tower.local.db}" if cfg.tower.local else f"tower {cfg.tower.url}"
    listen = f"{cfg.server.host}:{cfg.server.port}" if cfg.server.enabled else "off"
    decision = f", decision {cfg.decision.host}:{cfg.decision.port}" if cfg.decision else ""
    return (
        f"ok: {len(cfg.routes)} route(s), {tower}, jwt {cfg.jwt.algorithm}, "
        f"listen {listen}{decision}, ops {cfg.ops.host}:{cfg.ops.port}, "
        f"rate limit {cfg.rate_limit.backend}, redis {'on' if cfg.redis.url else 'off'}"
    )


__all__ = [
    "CREDENTIAL_SOURCES",
    "DEFAULT_DATA_DIR",
    "INTENT_HEADERS",
    "JWT_ALGORITHMS",
    "LOG_STREAMS",
    "MAX_CONFIG_DEPTH",
    "MAX_CONFIG_VALUES",
    "MIN_FINGERPRINT_SECRET",
    "MIN_HMAC_SECRET",
    "AdminConfig",
    "CacheConfig",
    "CapabilitiesConfig",
    "Config",
    "CredentialsConfig",
    "DecisionConfig",
    "JwtConfig",
    "KeyFormatConfig",
    "LocalTowerConfig",
    "LogConfig",
    "OpsConfig",
    "RateLimitConfig",
    "RedisConfig",
    "RouteConfig",
    "ServerConfig",
    "TowerConfig",
    "TracingConfig",
    "WebSocketConfig",
]
