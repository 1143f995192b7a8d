"""gateway.yaml's sections as frozen, typed dataclasses: field names are the YAML keys,
field types are checked, and `field(metadata={"check": ...})` adds value rules."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from types import MappingProxyType
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


JWT_ALGORITHMS: Final = ("HS256", "RS256", "ES256", "EdDSA")


CREDENTIAL_SOURCES: Final = ("x-api-key", "authorization")


MIN_HMAC_SECRET: Final = 32


MIN_FINGERPRINT_SECRET: Final = 32


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
def _pool_size(v: int) -> str | None:
    return None if v >= 2 else "must be at least 2 (the revocation subscription holds one)"


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
    # connection is kept (`gateway.http.server`), on every listener.
    header_timeout: float = _check(_positive, 10.0)
    keepalive_timeout: float = _check(_positive, 75.0)
    # false = decision only (`decision:`): no proxy listener, routes need no upstream.
    enabled: bool = True


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
class UsageReportConfig:
    """`tower.usage_report`: batched `POST {tower.url}/api/v1/usage` (CONTRACT section 11)."""

    interval: float = _check(_positive, 10.0)  # seconds between reports, at most
    max_keys: int = _check(_positive, 10_000)  # keys held between reports, at most


@dataclass(frozen=True, slots=True)
class TowerConfig:
    url: str | None = _check(_http_url, "http://127.0.0.1:9999")
    api_key: str | None = None
    secret: str | None = None
    timeout: float = _check(_positive, 2.0)
    connect_timeout: float | None = _check(_positive, None)
    max_connections: int = _check(_positive, 100)
    local: LocalTowerConfig | None = None
    usage_report: UsageReportConfig | None = None  # null: no usage reports
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
    # before the stale entry is served (gateway.auth.identity); 0 = never wait.
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
    # 429 too_many_failures (gateway.auth.clientguard); 0 = no limit.
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
    # Required while server.enabled; "" (unset) only in decision-only mode.
    upstream: str = _check(lambda v: _http_url(v) if v else None, "")
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
    # With the redis backend: "exact" asks Redis for every decision; "batched" decides in the
    # process on a share of each bucket and settles with Redis every sync_interval seconds.
    mode: str = _check(_one_of("exact", "batched"), "exact")
    sync_interval: float = _check(_positive, 0.1)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str | None = _check(_redis_url, None)
    key_prefix: str = "tower-gateway:"
    # Connections per process (the revocation subscription holds one), and how long a request
    # waits for one when all are busy before it goes without Redis.
    max_connections: int = _check(_pool_size, 100)
    pool_timeout: float = _check(_positive, 0.5)


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


def _token(v: str) -> str | None:
    return None if len(v) >= 16 else "must be at least 16 characters"


@dataclass(frozen=True, slots=True)
class DecisionConfig:
    """The decision listener for a data plane that is already there (CONTRACT 9)."""

    host: str = "127.0.0.1"
    port: int = _check(_port, 9092)
    # Seconds a data plane may reuse an allow answer; 0 = every request is decided.
    cache_ttl: float = _check(_non_negative, 0.0)
    # Shared secret the data plane sends in X-Tower-Gateway-Decision-Token; a decision
    # request without it is refused (403), so a client that reaches the listener cannot
    # forge an original request. Unset = not checked.
    token: str | None = _check(_token, None)
    # Peers (data plane addresses or CIDR blocks) allowed to ask; empty = any peer.
    allow_from: tuple[str, ...] = _check(_cidrs, ())


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Spans exported over OTLP/HTTP (gateway.ops.otlp); trace context is continued either way."""

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
    decision: DecisionConfig | None = None
    source: str = field(default="<dict>", metadata={"internal": True})
