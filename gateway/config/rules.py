"""Rules across keys, applied once the sections are built: defaults from the environment,
the embedded tower's database and data directory, fingerprint secrets, log paths relative
to the config file, route names."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from gateway.config.schema import (
    MIN_FINGERPRINT_SECRET,
    MIN_HMAC_SECRET,
    CacheConfig,
    Config,
    KeyFormatConfig,
    T,
    TowerConfig,
)
from gateway.errors import ConfigError


def _env_default(value: str | None, var: str, env: Mapping[str, str]) -> str | None:
    return value if value is not None else (env.get(var) or None)


def _finish_tower(tower: TowerConfig, env: Mapping[str, str], base: Path) -> TowerConfig:
    """The tower section's environment defaults and rules; the embedded tower's db made absolute."""
    tower = _replace(
        tower,
        api_key=_env_default(tower.api_key, "TOWER_API_KEY", env),
        secret=_env_default(tower.secret, "TOWER_SECRET", env),
    )
    if tower.local is None:
        # A remote tower needs its URL and both credentials; the embedded one
        # uses them only when served to other gateways (`tower serve`).
        if tower.url is None:
            raise ConfigError("tower.url", "is required when tower.local is not set")
        if not tower.api_key:
            raise ConfigError("tower.api_key", "is not set (set it or TOWER_API_KEY)")
        if not tower.secret:
            raise ConfigError("tower.secret", "is not set (set it or TOWER_SECRET)")
        return tower
    db = _local_db_path(tower.local.db, env, base)
    return _replace(tower, local=_replace(tower.local, db=str(db)))


DEFAULT_DATA_DIR: Final = "/var/lib/tower-gateway"


def _local_db_path(db: str, env: Mapping[str, str], base: Path) -> Path:
    """Where a `tower.local.db` lives: an absolute path as written; a relative one beside
    the config file when that directory is writable or already holds the database, else
    in the data directory ($TOWER_GATEWAY_DATA_DIR, default /var/lib/tower-gateway), as in
    a container whose config is mounted read-only."""
    path = Path(db)
    if path.is_absolute():
        return path
    beside = base / path
    if beside.exists() or _creatable(beside.parent):
        return beside
    data_dir = Path(env.get("TOWER_GATEWAY_DATA_DIR") or DEFAULT_DATA_DIR)
    in_data = data_dir / path
    if not _creatable(in_data.parent):
        raise ConfigError(
            "tower.local.db",
            f"cannot create {path} in {beside.parent} (the config directory) nor in "
            f"{in_data.parent} (the data directory): set TOWER_GATEWAY_DATA_DIR to a "
            "writable directory, or TOWER_GATEWAY_DB / tower.local.db to an absolute path",
        )
    return in_data


def _creatable(directory: Path) -> bool:
    """Whether files can be created in `directory` (made first when missing)."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)


def _finish(cfg: Config, env: Mapping[str, str], base: Path) -> Config:
    """Defaults that come from the environment, and rules that span several keys."""
    tower = _finish_tower(cfg.tower, env, base)
    if tower.local is not None:
        prefix = tower.local.prefix
        key_format = cfg.credentials.key_format
        if key_format is None and prefix is not None:
            # Every key the embedded tower issues has its prefix and checksum.
            key_format = KeyFormatConfig(prefix=prefix)
            cfg = _replace(cfg, credentials=_replace(cfg.credentials, key_format=key_format))
        elif key_format is not None and key_format.prefix != prefix:
            raise ConfigError(
                "credentials.key_format.prefix",
                f"must be the embedded tower's prefix ({prefix!r})",
            )

    jwt = cfg.jwt
    if jwt.algorithm.startswith("HS"):
        secret = _env_default(jwt.secret, "GATEWAY_JWT_SECRET", env)
        if not secret:
            raise ConfigError("jwt.secret", "is not set (set it or GATEWAY_JWT_SECRET)")
        if len(secret.encode()) < MIN_HMAC_SECRET:
            raise ConfigError("jwt.secret", f"must be at least {MIN_HMAC_SECRET} bytes")
        jwt = _replace(jwt, secret=secret)
    else:
        if not jwt.private_key_file:
            raise ConfigError("jwt.private_key_file", f"is required for {jwt.algorithm}")
        key_path = Path(jwt.private_key_file)
        if not key_path.is_absolute():
            key_path = base / key_path
        if not key_path.is_file():
            raise ConfigError("jwt.private_key_file", f"no such file: {key_path}")
        jwt = _replace(jwt, private_key_file=str(key_path))

    # An empty token (`${GATEWAY_ADMIN_TOKEN:-}`) means the admin API is off.
    admin = _replace(
        cfg.admin, token=_env_default(cfg.admin.token, "GATEWAY_ADMIN_TOKEN", env) or None
    )
    if admin.token is not None and len(admin.token) < 16:
        raise ConfigError("admin.token", "must be at least 16 characters")
    admin = _replace(
        admin,
        webhook_secret=_env_default(admin.webhook_secret, "GATEWAY_WEBHOOK_SECRET", env) or None,
    )
    if admin.webhook_secret is not None and len(admin.webhook_secret) < 16:
        raise ConfigError("admin.webhook_secret", "must be at least 16 characters")

    names = set()
    routes = []
    for i, route in enumerate(cfg.routes):
        name = route.name
        if name is None:
            # Derived names stay unique: a path listed twice (per-method routes)
            # gets a numeric suffix; explicit names must be unique as written.
            name = base_name = _route_name(route.path)
            suffix = 2
            while name in names:
                name, suffix = f"{base_name}_{suffix}", suffix + 1
        elif name in names:
            raise ConfigError(f"routes[{i}].name", f"duplicate route name {name!r}")
        names.add(name)
        if not route.upstream and cfg.server.enabled:
            raise ConfigError(
                f"routes[{i}].upstream", "is required (unless server.enabled is false)"
            )
        routes.append(_replace(route, name=name))
    if not routes:
        raise ConfigError("routes", "needs at least one route")

    if not cfg.server.enabled and cfg.decision is None:
        raise ConfigError("server.enabled", "false needs a decision listener (decision:)")
    if cfg.rate_limit.backend == "redis" and not cfg.redis.url:
        raise ConfigError("rate_limit.backend", "redis needs redis.url")
    cache = _fingerprint_secrets(cfg, env)

    log = _replace(
        cfg.log,
        file=_log_path(cfg.log.file, "log.file", base),
        audit=_log_path(cfg.log.audit, "log.audit", base),
    )
    return _replace(
        cfg, tower=tower, jwt=jwt, admin=admin, routes=tuple(routes), log=log, cache=cache
    )


def _fingerprint_secrets(cfg: Config, env: Mapping[str, str]) -> CacheConfig:
    """With Redis, the fleet's shared secret is required: whoever can write to Redis must not be
    able to sign an entry or a revocation, and nothing public may stand in for it."""
    cache = cfg.cache
    secret = _env_default(cache.fingerprint_secret, "GATEWAY_FINGERPRINT_SECRET", env) or None
    need = f"at least {MIN_FINGERPRINT_SECRET} characters (e.g. `openssl rand -hex 32`)"
    if secret is None:
        if cfg.redis.url:
            raise ConfigError(
                "cache.fingerprint_secret",
                f"is required with redis.url (set it or GATEWAY_FINGERPRINT_SECRET): {need}",
            )
    elif len(secret) < MIN_FINGERPRINT_SECRET:
        raise ConfigError("cache.fingerprint_secret", f"must be {need}")
    for i, previous in enumerate(cache.previous_fingerprint_secrets):
        if len(previous) < MIN_FINGERPRINT_SECRET:
            raise ConfigError(f"cache.previous_fingerprint_secrets[{i}]", f"must be {need}")
    if cache.previous_fingerprint_secrets and secret is None:
        raise ConfigError(
            "cache.previous_fingerprint_secrets", "needs cache.fingerprint_secret (the new one)"
        )
    return _replace(cache, fingerprint_secret=secret)


LOG_STREAMS: Final = ("stdout", "stderr")


def _log_path(target: str | None, key: str, base: Path) -> str | None:
    """A log file path made absolute (relative to the config file), checked to be writable
    where it will be created; `stdout`, `stderr` and null pass through."""
    if target is None or target in LOG_STREAMS:
        return target
    path = Path(target)
    if not path.is_absolute():
        path = base / path
    if path.is_dir():
        raise ConfigError(key, f"{path} is a directory")
    if not path.parent.is_dir():
        raise ConfigError(key, f"directory {path.parent} does not exist")
    return str(path)


def _route_name(path: str) -> str:
    name = re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_")
    return name or "root"


def _replace(obj: T, **changes: Any) -> T:
    import dataclasses

    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
