"""gateway.yaml as frozen, typed sections; `load_config` validates and names the bad key.

The schema is the dataclasses below: field names are the YAML keys, field types
are checked (unknown keys are errors), and `field(metadata={"check": ...})`
adds value rules. `${VAR}` and `${VAR:-default}` are expanded in every string
value after parsing, so secrets never have to be YAML-safe.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import secrets
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import yaml

from gateway.errors import ConfigError

T = TypeVar("T")

JWT_ALGORITHMS: Final = ("HS256", "RS256", "ES256", "EdDSA")
CREDENTIAL_SOURCES: Final = ("x-api-key", "authorization")
MIN_HMAC_SECRET: Final = 32
MIN_FINGERPRINT_SECRET: Final = 32
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _EnvStr(str):
    """A string produced by `${VAR}` expansion: may be read as a number or bool."""


Check = Callable[[Any], str | None]


def _check(fn: Check, default: Any = MISSING, **kw: Any) -> Any:
    if default is MISSING and "default_factory" not in kw:
        return field(metadata={"check": fn}, **kw)
    return field(default=default, metadata={"check": fn}, **kw)


def _positive(v: Any) -> str | None:
    return None if v is None or v > 0 else "must be greater than 0"


def _non_negative(v: Any) -> str | None:
    return None if v is None or v >= 0 else "must not be negative"


def _fraction(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be at least 0 and less than 1"


def _ratio(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be from 0 to 1"


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "not a port number (0-65535)"


def _http_url(v: str | None) -> str | None:
    if v is None:
        return None
    try:
        parts = urlsplit(v)
    except ValueError:  # `http://[::1`: an IPv6 literal that does not close
        return "not a URL (http:// or https://)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not a URL (http:// or https://)"
    if parts.query or parts.fragment or parts.username or parts.password:
        return "not a URL without credentials, query or fragment"
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "not a URL: bad port"
    return None


def _redis_url(v: str | None) -> str | None:
    if v is None:
        return None
    try:
        scheme = urlsplit(v).scheme
    except ValueError:
        scheme = ""
    return None if scheme in ("redis", "rediss", "unix") else "not a redis:// URL"


def _one_of(*choices: str) -> Check:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _route_path(v: str) -> str | None:
    if not v.startswith("/") or "?" in v or "#" in v:
        return "must be a path starting with / (no query)"
    if "//" in v or "/./" in f"{v}/" or "/../" in f"{v}/":
        return "must be a normalised path (no //, . or .. segments)"
    return None


# Headers that ask an upstream to treat a request as another method or URL; removed
# unless a route names them in `forward_headers`.
INTENT_HEADERS: Final = frozenset(
    {
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
        "x-override-url",
    }
)


def _forward_headers(v: tuple[str, ...]) -> str | None:
    for name in v:
        if name.lower() not in INTENT_HEADERS:
            return f"{name!r} is not one of {', '.join(sorted(INTENT_HEADERS))}"
    return None


def _audience(v: str | None) -> str | None:
    if v is not None and not re.fullmatch(r"[\x21-\x7e]{1,256}", v):
        return "must be 1-256 printable characters without spaces"
    return None


def _cidrs(v: tuple[str, ...]) -> str | None:
    for item in v:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"not an IP address or CIDR: {item!r}"
    return None


def _methods(v: tuple[str, ...] | None) -> str | None:
    if v is not None and any(not re.fullmatch(r"[A-Z]+", m) for m in v):
        return "methods must be upper-case HTTP method names"
    return None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = _check(_port, 8080)
    max_body_size: int | None = _check(_positive, None)
    trusted_proxies: tuple[str, ...] = _check(_cidrs, ())
    shutdown_timeout: float = _check(_non_negative, 30.0)
    max_line_size: int = _check(_positive, 8190)
    max_field_size: int = _check(_positive, 8190)
    # Seconds a client has to send a request's head, and an idle keep-alive
    # connection is kept (`gateway.httpserver`), on every listener.
    header_timeout: float = _check(_positive, 10.0)
    keepalive_timeout: float = _check(_positive, 75.0)


@dataclass(frozen=True, slots=True)
class OpsConfig:
    host: str = "127.0.0.1"
    port: int = _check(_port, 9091)


@dataclass(frozen=True, slots=True)
class LocalTowerConfig:
    db: str
    prefix: str = _check(
        lambda v: None if re.fullmatch(r"[a-z][a-z0-9]{0,15}", v) else "must be 1-16 of a-z0-9",
        "tk",
    )
    # Keyed-hash secret for stored keys; generated beside the database when unset.
    hash_secret: str | None = None
    usage_flush_interval: float = _check(_positive, 5.0)


@dataclass(frozen=True, slots=True)
class TowerConfig:
    url: str | None = _check(_http_url, "http://127.0.0.1:9999")
    api_key: str | None = None
    secret: str | None = None
    timeout: float = _check(_positive, 2.0)
    connect_timeout: float | None = _check(_positive, None)
    max_connections: int = _check(_positive, 100)
    local: LocalTowerConfig | None = None
    # Resilience of the remote tower client (gateway/tower/resilient.py).
    retries: int = _check(_non_negative, 2)
    retry_backoff: float = _check(_non_negative, 0.05)  # first backoff cap; doubles per retry
    retry_backoff_max: float = _check(_non_negative, 0.5)
    budget: float | None = _check(_positive, None)  # all attempts together; null = timeout
    breaker_threshold: int = _check(_positive, 5)  # consecutive faults that open the circuit
    # Seconds between probe calls while the circuit is open: a probe goes as soon as a request
    # needs the tower once this much time has passed since the last one, one at a time.
    breaker_reset: float = _check(_positive, 0.5)
    max_concurrency: int = _check(_positive, 64)  # tower calls in flight at once


@dataclass(frozen=True, slots=True)
class CacheConfig:
    ttl: float = _check(_non_negative, 300.0)
    negative_ttl: float = _check(_non_negative, 30.0)
    max_entries: int = _check(_positive, 100_000)
    stale_if_error: float = _check(_non_negative, 300.0)
    # The last part of an entry's fresh life (a fraction of it) in which a request that uses
    # the entry starts a background refresh; 0 = refresh only once the entry is stale.
    refresh_ahead: float = _check(_fraction, 0.2)
    # How long a request whose entry went stale while nothing refreshed it waits for the tower
    # before the stale entry is served (gateway.identity); 0 = never wait.
    refresh_wait: float = _check(_non_negative, 0.05)
    # Keyed-hash secret for cache keys and key fingerprints, and the key of everything replicas
    # share through Redis (entries, revocation messages): required with redis.url (or
    # GATEWAY_FINGERPRINT_SECRET), at least MIN_FINGERPRINT_SECRET characters. Without Redis it
    # may be unset: it is then derived from the private signing material, never a public one.
    fingerprint_secret: str | None = None
    # Secrets accepted besides fingerprint_secret while a new one rolls out (README, Redis).
    previous_fingerprint_secrets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyFormatConfig:
    """Keys look like `<prefix>_<test|live>_<32 random><6 checksum>` (gateway.tower.keyformat)."""

    prefix: str = _check(
        lambda v: None if re.fullmatch(r"[a-z][a-z0-9]{0,15}", v) else "must be 1-16 of a-z0-9",
        "tk",
    )


@dataclass(frozen=True, slots=True)
class CredentialsConfig:
    sources: tuple[str, ...] = _check(
        lambda v: (
            None
            if v and all(s in CREDENTIAL_SOURCES for s in v) and len(set(v)) == len(v)
            else f"must be a non-empty list of distinct {', '.join(CREDENTIAL_SOURCES)}"
        ),
        CREDENTIAL_SOURCES,
    )
    max_key_length: int = _check(_positive, 512)
    # Failed authentications one client address may make a minute before it gets
    # 429 too_many_failures (gateway.clientguard); 0 = no limit.
    failed_auth_per_minute: float = _check(_non_negative, 60.0)
    # The tower's key format, checked before the tower is asked; null = any key
    # goes to the tower. Defaults to the embedded tower's prefix when it is used.
    key_format: KeyFormatConfig | None = None


def _default_roles() -> Mapping[str, str]:
    names = ("admin", "operator", "observer", "node", "api_client")
    return MappingProxyType({n: n for n in names})


@dataclass(frozen=True, slots=True)
class CapabilitiesConfig:
    roles: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({"admin": ("*",)})
    )
    scopes: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType(
            {"admin:full": ("*",), "tools:execute": ("execute:*",)}
        )
    )
    keep_scopes: bool = True


@dataclass(frozen=True, slots=True)
class RouteConfig:
    path: str = _check(_route_path)
    upstream: str = _check(_http_url)
    name: str | None = None
    methods: tuple[str, ...] | None = _check(_methods, None)
    require: tuple[str, ...] = ()
    auth: bool = True
    websocket: bool = True
    timeout: float = _check(_positive, 30.0)
    enforce: bool = True
    preserve_host: bool = False
    # `%2F` in this route's paths is kept (encoded, never decoded for matching).
    allow_encoded_slash: bool = False
    forward_headers: tuple[str, ...] = _check(_forward_headers, ())
    # The `aud` of the JWTs this route's upstream gets; None: `jwt.audience`.
    audience: str | None = _check(_audience, None)


def _default_routes() -> tuple[RouteConfig, ...]:
    return (RouteConfig(path="/", upstream="http://127.0.0.1:9000"),)


@dataclass(frozen=True, slots=True)
class JwtConfig:
    header: str = _check(
        lambda v: None if re.fullmatch(r"[A-Za-z0-9-]+", v) else "not a header name",
        "Authorization",
    )
    algorithm: str = _check(_one_of(*JWT_ALGORITHMS), "HS256")
    secret: str | None = None
    private_key_file: str | None = None
    kid: str | None = None
    issuer: str = "tower-gateway"
    audience: str = "internal"
    ttl: float = _check(lambda v: None if v >= 10 else "must be at least 10 seconds", 300.0)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    default_per_minute: float = _check(_non_negative, 100.0)
    backend: str = _check(_one_of("memory", "redis"), "memory")
    burst: int | None = _check(_positive, None)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str | None = _check(_redis_url, None)
    key_prefix: str = "tower-gateway:"


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    auth_timeout: float = _check(_positive, 10.0)
    allowed_origins: tuple[str, ...] | None = None
    max_message_size: int = _check(_positive, 1024 * 1024)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    token: str | None = None
    # HMAC-SHA256 key of the tower's revocation webhook (POST /admin/revocations); unset = off.
    webhook_secret: str | None = None


def _log_target(v: str) -> str | None:
    return None if v.strip() else "must be stdout, stderr or a file path"


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = _check(_one_of("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")
    access: bool = True
    # Where access lines go: null (stdout), stdout, stderr or a file path (appended to,
    # reopened on SIGHUP so logrotate can move it).
    file: str | None = _check(_log_target, None)
    # Audit events (authentications, admin actions): stdout, stderr, a file path, or null
    # for none; the most recent ones are kept for GET /admin/audit either way.
    audit: str | None = _check(_log_target, "stdout")


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Spans exported over OTLP/HTTP (gateway.otlp); trace context is continued either way."""

    # The collector's traces URL, e.g. http://otel-collector:4318/v1/traces; null = no spans.
    otlp_endpoint: str | None = _check(_http_url, None)
    # Share of new traces recorded; a client's sampled flag decides for the traces it continues.
    sample_ratio: float = _check(_ratio, 1.0)
    export_interval: float = _check(_positive, 5.0)  # seconds between batches
    timeout: float = _check(_positive, 5.0)  # per batch, retries included
    service_name: str = "tower-gateway"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    tower: TowerConfig = field(default_factory=TowerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    roles: Mapping[str, str] = field(default_factory=_default_roles)
    capabilities: CapabilitiesConfig = field(default_factory=CapabilitiesConfig)
    routes: tuple[RouteConfig, ...] = field(default_factory=_default_routes)
    jwt: JwtConfig = field(default_factory=JwtConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    source: str = field(default="<dict>", metadata={"internal": True})


# --------------------------------------------------------------------------- expansion


@dataclass(frozen=True, slots=True)
class _Refs:
    """The `${...}` references of one text and the placeholder spelling that stands for them.

    The spelling carries a random tag that the text itself does not contain, so no literal
    config text can stand for a reference (and pull an environment value in) or name one
    that does not exist.
    """

    pattern: re.Pattern[str]
    values: tuple[str, ...]
    marker: str


def _protect(text: str) -> tuple[str, _Refs | None]:
    """Swap each `${...}` for a YAML-safe placeholder before parsing.

    `admin: {token: ${TOKEN}}` is not valid YAML (the braces), yet the
    contract lets `${VAR}` stand anywhere; placeholders parse as plain scalars
    in block and flow style, and are expanded after parsing, so a secret's
    characters never meet the YAML parser. References in comments vanish with
    the comments and are never looked up.
    """
    if "${" not in text:
        return text, None
    marker = "__tower_gateway_env_" + secrets.token_hex(8)
    while marker in text:  # pragma: no cover - a 64-bit random tag already in the text
        marker = "__tower_gateway_env_" + secrets.token_hex(8)
    refs: list[str] = []

    def swap(match: re.Match[str]) -> str:
        refs.append(match.group(0))
        return f"{marker}_{len(refs) - 1}__"

    protected = _ENV_REF.sub(swap, text)
    pattern = re.compile(re.escape(marker) + r"_(\d+)__")
    return protected, _Refs(pattern, tuple(refs), marker)


def _expand(node: Any, path: str, env: Mapping[str, str], refs: _Refs | None = None) -> Any:
    if isinstance(node, dict):
        return {
            _expand(k, path, env, refs): _expand(v, _join(path, str(k)), env, refs)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_expand(v, f"{path}[{i}]", env, refs) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node
    if refs is not None and refs.marker in node:
        values = refs.values
        node = refs.pattern.sub(lambda m: values[int(m.group(1))], node)
    if "${" not in node:
        return node

    def substitute(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(path, f"environment variable {name} is not set")
            return default
        return value

    return _EnvStr(_ENV_REF.sub(substitute, node))


MAX_CONFIG_VALUES: Final = 100_000
MAX_CONFIG_DEPTH: Final = 32


def _check_shape(data: Any) -> None:
    """Bounds the document before it is walked recursively: YAML aliases can make a
    small file a huge tree (each `*a` is a whole copy to walk) or a cycle (`&a [*a]`)."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError("", f"more than {MAX_CONFIG_VALUES} values (YAML aliases count)")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError("", f"nested deeper than {MAX_CONFIG_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
            stack.extend((key, depth + 1) for key in node)
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------- typing


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin in (Mapping, dict) or tp is Mapping:
        return "a mapping"
    if is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, str(tp)
    )


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                if exc.path != path:
                    raise
                errors.append(exc)
        raise ConfigError(path, f"expected {_describe(tp)}")
    if isinstance(tp, type) and is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, "expected a mapping")
        return _build(tp, value, path)
    if origin is tuple:
        (item,) = get_args(tp)[:1]
        if not isinstance(value, list):
            raise ConfigError(path, f"expected {_describe(tp)}")
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or origin is typing.Mapping:
        key_tp, value_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(path, "expected a mapping")
        out = {}
        for k, v in value.items():
            sub = _join(path, str(k))
            out[_coerce(key_tp, k, sub)] = _coerce(value_tp, v, sub)
        return MappingProxyType(out)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, _EnvStr) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(path, "expected true or false")
    if tp in (int, float):
        if isinstance(value, _EnvStr):
            try:
                value = int(value) if tp is int else float(value)
            except ValueError:
                raise ConfigError(path, f"expected {_describe(tp)}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected {_describe(tp)}")
        if tp is int and not isinstance(value, int):
            raise ConfigError(path, "expected an integer")
        try:
            number = tp(value)
        except OverflowError:  # an integer beyond any float
            raise ConfigError(path, f"{_describe(tp)} out of range") from None
        # inf or nan pass every "> 0" check and break later arithmetic (int(ttl)).
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(path, "expected a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, "expected a string")
        return str(value)
    raise ConfigError(path, f"unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type[T], data: Mapping[str, Any], path: str) -> T:
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}  # type: ignore[arg-type]
    for key in data:
        if key not in known:
            raise ConfigError(_join(path, str(key)), "unknown key")
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        sub = _join(path, name)
        if name in data:
            value = _coerce(hints[name], data[name], sub)
        elif f.default is not MISSING:
            value = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(sub, "is required")
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(sub, problem)
        kwargs[name] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------- rules across keys


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
        routes.append(_replace(route, name=name))
    if not routes:
        raise ConfigError("routes", "needs at least one route")

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
    return (
        f"ok: {len(cfg.routes)} route(s), {tower}, jwt {cfg.jwt.algorithm}, "
        f"listen {cfg.server.host}:{cfg.server.port}, ops {cfg.ops.host}:{cfg.ops.port}, "
        f"rate limit {cfg.rate_limit.backend}, redis {'on' if cfg.redis.url else 'off'}"
    )
