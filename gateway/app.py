"""Wiring: one `Gateway` per config, the request pipeline, and the aiohttp applications.

A request flows one way: path -> route -> credentials -> identity (cache,
tower) -> capabilities -> policy -> rate limit -> token -> proxy. Errors become
responses in exactly one place, `Gateway.handle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from random import getrandbits
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote_plus

import redis.asyncio
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, istr
from prometheus_client import CollectorRegistry

from gateway.accesslog import AccessLog, RequestRecord
from gateway.audit import AuditLog
from gateway.capabilities import CapabilityMapper, Grants
from gateway.clientguard import FailureThrottle, check_request, key_shape_ok
from gateway.config import Config
from gateway.credentials import CredentialExtractor
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    InvalidKey,
    MissingKey,
    RateLimited,
)
from gateway.explain import SHADOW_STATUSES
from gateway.httpserver import ANSWER, NOSNIFF, REQUEST_ID, TIMEOUTS, Timeouts, listener_app
from gateway.identity import CacheStats, Fingerprinter, IdentityResolver, Resolved, derive_secret
from gateway.metrics import Metrics
from gateway.proxy import (
    Forwarder,
    HeaderPolicy,
    IPNetwork,
    add_forwarding,
    connection_tokens,
    forward_intent,
    query_holds_key,
)
from gateway.ratelimit import (
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    effective_limit,
)
from gateway.reload import Reloader
from gateway.routes import Route, RouteTable, normalise_path
from gateway.shared import LOCK_MARGIN, Replicas, redis_client
from gateway.tokens import SigningKey, TokenMinter, load_signing_key, private_material
from gateway.tower import Tower
from gateway.tracing import CURRENT as CURRENT_TRACE
from gateway.tracing import TraceContext, continue_trace, span
from gateway.websocket import SocketRegistry

if TYPE_CHECKING:
    from gateway.otlp import OtlpSpans

log = logging.getLogger("tower_gateway")

# Tells the upstream of a shadow route (`enforce: false`) what enforcement would have done.
SHADOW_DECISION: Final = "X-Gateway-Shadow-Decision"
_REQUEST_ID_OK: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Query parameter names that carry a key, compared after decoding and without
# separators, so `api%5Fkey`, `API-KEY` and `api.key` are all caught.
QUERY_KEY_PARAMS: Final = frozenset({"apikey", "xapikey"})
_NAME_NOISE: Final = re.compile(r"[^a-z0-9]")


class _RedactMalformed(logging.Filter):
    """aiohttp logs a request it cannot parse with the offending bytes, which may hold a
    key (`X-API-Key: <key>\x01`): keep the fact and the peer, drop the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg, record.args = (
                "malformed HTTP request from %s (%s)",
                (peer, type(exc).__name__),
            )
            record.exc_info, record.exc_text = None, None
        return True


# The HTTP server's own log (parse errors, broken connections) for the proxy listener.
http_log: Final = logging.getLogger("tower_gateway.http")
http_log.addFilter(_RedactMalformed())


def make_tower(
    config: Config,
    *,
    on_circuit_change: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Tower:
    if config.tower.local is not None:
        from gateway.tower.local import LocalTower

        # In-process SQLite: nothing to retry, no network to break the circuit of.
        return LocalTower(config.tower.local)
    from gateway.tower.client import RemoteTower
    from gateway.tower.resilient import ResilientTower

    return ResilientTower.from_config(
        RemoteTower(config.tower), config.tower, clock=clock, on_state_change=on_circuit_change
    )


def request_id(value: str | None) -> str:
    if value is not None and _REQUEST_ID_OK.fullmatch(value):
        return value
    # 128 random bits, like uuid4, without a system call per request: an id only
    # has to be unique, and `random` is reseeded from os.urandom in every process.
    return f"{getrandbits(128):032x}"


def error_response(exc: GatewayError, rid: str) -> web.Response:
    body = json.dumps({"error": exc.reason, "detail": exc.detail})
    response = web.Response(status=exc.status, text=body, content_type="application/json")
    response.headers.update(exc.headers)
    response.headers[REQUEST_ID] = rid
    response.headers[NOSNIFF[0]] = NOSNIFF[1]
    if exc.close:
        response.force_close()
    return response


@dataclass(frozen=True, slots=True)
class Components:
    """Everything a request needs that a config reload may replace at once."""

    config: Config
    routes: RouteTable
    extractor: CredentialExtractor
    mapper: CapabilityMapper
    headers: HeaderPolicy
    www_authenticate: str
    jwt_header: istr  # `jwt.header`, case-folded once
    trusted_proxies: tuple[IPNetwork, ...] = ()


def build_components(config: Config) -> Components:
    extractor = CredentialExtractor(
        config.credentials.sources, max_length=config.credentials.max_key_length
    )
    blocked = [config.jwt.header, *extractor.header_names]
    return Components(
        config=config,
        routes=RouteTable(config.routes, audience=config.jwt.audience),
        extractor=extractor,
        mapper=CapabilityMapper(config),
        headers=HeaderPolicy(blocked),
        www_authenticate='Bearer realm="tower-gateway", ApiKey header="X-API-Key"',
        jwt_header=istr(config.jwt.header),
        trusted_proxies=tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in config.server.trusted_proxies
        ),
    )


@dataclass(frozen=True, slots=True)
class Authorization:
    """A key that passed the policy: who it is, what it may do, and its JWT."""

    resolved: Resolved
    grants: Grants
    token: str
    # Set on a shadow route when policy (403, 429) would have refused: forwarded anyway.
    would_deny: GatewayError | None = None


class Gateway:
    """The gateway for one config: its caches, clients and applications."""

    def __init__(
        self,
        config: Config,
        *,
        tower: Tower | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        access_log: AccessLog | None = None,
        audit: AuditLog | None = None,
        tower_clock: Callable[[], float] = time.monotonic,  # the circuit breaker's periods
    ) -> None:
        self.config = config
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.signing_key: SigningKey = load_signing_key(config.jwt)
        # Computed once: a signing key rotated by a reload does not re-key the caches.
        self._fp_secret = self._fingerprint_secret()
        self.fingerprinter = Fingerprinter(self._fp_secret)
        self.tower: Tower = (
            tower
            if tower is not None
            else make_tower(config, on_circuit_change=self.metrics.circuit_state, clock=tower_clock)
        )
        self.resolver = IdentityResolver(
            self.tower,
            config.cache,
            self.fingerprinter,
            clock=clock,
            on_tower_call=self.metrics.tower_call,
        )
        self.minter = TokenMinter(config.jwt, self.signing_key, clock=clock)
        self.forwarder = Forwarder(max_body_size=config.server.max_body_size)
        self.spans: OtlpSpans | None = None
        if config.tracing.otlp_endpoint:
            from gateway.otlp import OtlpSpans  # the SDK is imported only when spans are on

            self.spans = OtlpSpans(config.tracing, self.registry)
        self.limiter: RateLimiter | None = None
        self._redis: redis.asyncio.Redis | None = None
        self.replicas: Replicas | None = None
        if config.redis.url:
            self.redis_ok = self._redis_ok  # ops readiness looks for it
        self.components = build_components(config)
        self.access_log = access_log if access_log is not None else AccessLog.from_config(config)
        self.audit = audit if audit is not None else AuditLog.from_config(config)
        self.metrics.watch(self._stats)
        self.metrics.watch_logs(
            lambda: {"access": self.access_log.dropped, "audit": self.audit.dropped}
        )
        self.reloader = Reloader(self)
        self.sockets = SocketRegistry(self.metrics, drain_timeout=config.server.shutdown_timeout)
        # Per process, like the memory rate limiter; kept across config reloads.
        self.failures = FailureThrottle()

    def _fingerprint_secret(self) -> bytes:
        """The keyed-hash secret of cache keys and fingerprints. Configured (required with
        Redis, where it also keys what replicas share), or derived from the private signing
        material: never from anything the gateway publishes (the JWKS, the kid)."""
        if self.config.cache.fingerprint_secret:
            return self.config.cache.fingerprint_secret.encode()
        return derive_secret(private_material(self.signing_key), "fingerprint")

    def _shared_secrets(self) -> list[bytes]:
        """The keys of what replicas share: the current secret first (it signs), then the
        previous ones, still accepted while a rotation rolls out."""
        cache = self.config.cache
        secrets = [self._fp_secret]
        secrets += [s.encode() for s in cache.previous_fingerprint_secrets]
        return [derive_secret(s, "shared-cache") for s in secrets]

    def _stats(self) -> tuple[CacheStats, int, int, int, int]:
        positive, negative = self.resolver.entry_counts()
        return self.resolver.stats, positive, negative, self.minter.minted, self.minter.reused

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        start = getattr(self.tower, "start", None)
        if start is not None:
            await start()
        if self.config.redis.url:
            tower = self.config.tower
            self._redis = redis_client(self.config.redis.url)
            self.replicas = Replicas(
                self._redis,
                prefix=self.config.redis.key_prefix,
                config=self.config.cache,
                keys=self._shared_secrets(),
                # One tower call (all its retries) plus a margin.
                lock_ttl=(tower.budget or tower.timeout) + LOCK_MARGIN,
                forget=self.forget_locally,
                drop_cache=self._drop_cache,
                on_error=lambda op: self.metrics.redis_errors.labels(op).inc(),
                clock=self.clock,
            )
            self.resolver.shared = self.replicas.cache
            self.replicas.start()
        self.limiter = await self._build_limiter()

    async def _build_limiter(self) -> RateLimiter:
        settings = self.config.rate_limit
        if settings.backend == "redis" and self._redis is not None:
            return RedisRateLimiter(
                self._redis,
                prefix=self.config.redis.key_prefix,
                burst=settings.burst,
                fallback=MemoryRateLimiter(burst=settings.burst),
                on_fallback=self.metrics.rate_limit_fallbacks.inc,
            )
        return MemoryRateLimiter(burst=settings.burst)

    async def close(self) -> None:
        await self.resolver.close()
        if self.spans is not None:
            await asyncio.to_thread(self.spans.shutdown)  # the last batch, bounded
        await self.forwarder.close()
        if self.limiter is not None:
            await self.limiter.close()
        if self.replicas is not None:
            await self.replicas.close()
        if self._redis is not None:
            await self._redis.aclose()
        await self.tower.close()
        self.access_log.close()
        self.audit.close()

    async def _lifespan(self, _app: web.Application) -> AsyncIterator[None]:
        await self.start()
        yield
        await self.close()

    def proxy_app(self) -> web.Application:
        app = web.Application(
            handler_args={
                "max_field_size": self.config.server.max_field_size,
                "max_line_size": self.config.server.max_line_size,
                "logger": http_log,
            }
        )
        app[GATEWAY] = self
        app[TIMEOUTS] = Timeouts.of(self.config.server)
        app.cleanup_ctx.append(self._lifespan)
        app.on_shutdown.append(self.sockets.on_shutdown)
        # Every request, whatever its path or method, goes to `handle`: served by
        # `GatewayRunner` (as `serve` and `demo` do), the app has no routes of its own.
        app[ANSWER] = self.handle
        return app

    def ops_app(self) -> web.Application:
        from gateway.ops import create_ops_app

        return listener_app(create_ops_app(self), self.config.server)

    def rotate_signing_key(self, key: SigningKey, config: Config) -> None:
        """Sign new tokens with `key` at once (a reload found a new key file or secret)."""
        self.signing_key = key
        self.minter.rotate(key, config.jwt)

    def apply_config(self, config: Config) -> None:
        """Swap in a reloaded config (`gateway.reload`): one assignment, so a request that
        read `components` before it keeps all of the old, and one after gets all of the new."""
        self.components = build_components(config)
        self.config = config

    # ------------------------------------------------------------------ admin actions

    def invalidate_key_id(self, key_id: str) -> int:
        """Drop one key here at once, and on every replica through Redis in the background."""
        dropped = self.forget_locally([key_id])
        if self.replicas is not None:
            self.replicas.revoke_soon([key_id])
        return dropped

    def invalidate_all(self) -> None:
        self.forget_locally(None)
        if self.replicas is not None:
            self.replicas.revoke_soon(None)

    async def revoke_key_ids(self, key_ids: Sequence[str]) -> int:
        """Like `invalidate_key_id`, returning once Redis and the other replicas were told."""
        dropped = self.forget_locally(key_ids)
        if self.replicas is not None:
            await self.replicas.revoke(key_ids)
        return dropped

    async def revoke_all(self) -> None:
        self.forget_locally(None)
        if self.replicas is not None:
            await self.replicas.revoke(None)

    def forget_locally(self, key_ids: Sequence[str] | None) -> int:
        """This process only (None: everything): identities, tokens, open WebSockets. What a
        revocation from another replica applies here."""
        if key_ids is None:
            self._drop_cache()
            self.sockets.invalidate_all()
            return 0
        digests = self.resolver.invalidate_key_ids(key_ids)
        for key_id in key_ids:
            self.sockets.invalidate_key_id(key_id)
        self.minter.forget(digests)
        return len(digests)

    def fingerprint(self, resolved: Resolved) -> str:
        """The short fingerprint of a resolved key (what logs and `explain` show)."""
        return self.fingerprinter.short(resolved.digest)

    def _drop_cache(self) -> None:
        self.resolver.clear()
        self.minter.forget()

    async def _redis_ok(self) -> bool:
        return self.replicas is not None and await self.replicas.ping()

    # ------------------------------------------------------------------ the pipeline

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        trace = continue_trace(request.headers)
        request_span = None
        if self.spans is not None:
            trace, request_span = self.spans.request(trace, request.method)
        record = RequestRecord(request_id(request.headers.get(REQUEST_ID)), trace_id=trace.trace_id)
        metrics = self.metrics
        metrics.in_flight += 1
        traced = CURRENT_TRACE.set(trace)  # read by the tower client, in the single-flight task
        try:
            response = await self._pipeline(request, record, trace)
        except GatewayError as exc:
            record.reason = exc.reason
            if record.decision is None:
                record.decision = "deny" if exc.status in (401, 403, 429) else "error"
            response = error_response(exc, record.request_id)
            if hdrs.EXPECT in request.headers and not request.content.is_eof():
                # Refused before `100 Continue`: the client may send its body or
                # not, so nothing more on this connection can be told apart from
                # it. Answered, then closed (not left waiting for that body).
                response.force_close()
                with contextlib.suppress(ConnectionError):
                    await response.prepare(request)
                    await response.write_eof()
                request.protocol.force_close()
        except Exception:
            log.exception("unhandled error in request %s", record.request_id)
            record.reason, record.decision = "internal_error", "error"
            response = error_response(
                GatewayError("internal error", reason="internal_error"), record.request_id
            )
        finally:
            metrics.in_flight -= 1
            CURRENT_TRACE.reset(traced)
        record.status = response.status
        metrics.count_request(record.route, response.status)
        record.duration = time.perf_counter() - started
        self.access_log.write(request, record)
        if request_span is not None and self.spans is not None:
            self.spans.finish(
                request_span,
                method=record.method or request.method,
                route=record.route,
                status=record.status,
                decision=record.decision,
                reason=record.reason,
                fingerprint=record.fingerprint,
                request_id=record.request_id,
                path=record.path,
            )
        return response

    async def _pipeline(
        self, request: web.BaseRequest, record: RequestRecord, trace: TraceContext
    ) -> web.StreamResponse:
        # Read once: a reload swaps `self.components`, and this request finishes on these.
        parts = self.components
        record.client = client_address(request, parts.trusted_proxies)
        raw_path, _, query = request.raw_path.partition("?")
        # Logged as sent (still %-escaped): what the client asked for, not a decoding of it.
        record.method, record.path = request.method, raw_path
        check_request(request)
        path = normalise_path(raw_path)
        if query and _has_query_key(query):
            raise BadRequest(
                "API keys are not accepted in the URL; send X-API-Key", reason="key_in_query"
            )
        route = parts.routes.match(path, request.method)
        record.route = route.name
        self.forwarder.check_length(request)

        headers = parts.headers.forwardable(request.headers, connection_tokens(request.headers))
        if route.forward:
            forward_intent(headers, request.headers, route.forward)
        candidates = parts.extractor.candidates(request.headers)
        parts.headers.scrub(headers, candidates)
        trace.inject(headers)
        if query and candidates and query_holds_key(query, candidates):
            raise BadRequest(
                "API keys are not accepted in the URL; send X-API-Key", reason="key_in_query"
            )
        response_headers: dict[str, str] = {REQUEST_ID: record.request_id}
        if route.config.websocket and _is_upgrade(request):
            from gateway.websocket import handle_websocket

            return await handle_websocket(
                self, request, route, path, query, headers, record, parts=parts
            )
        if route.config.auth:
            shadow = not route.config.enforce
            try:
                key = self._key(request, record, parts, shadow=shadow)
                authorization = await self.authorize(
                    key, route, record, response_headers, parts=parts, shadow=shadow
                )
            except GatewayError as exc:
                self.metrics.count_auth(exc.reason)
                if not (shadow and exc.status in SHADOW_STATUSES):
                    raise
                # Shadow mode without an identity: forwarded, but with no JWT at all.
                self._would_deny(route, record, exc, headers)
            else:
                denied = authorization.would_deny
                self.metrics.count_auth("success" if denied is None else denied.reason)
                if denied is not None:
                    self._would_deny(route, record, denied, headers)
                headers[parts.jwt_header] = f"Bearer {authorization.token}"
        else:
            record.decision, record.reason = "public", "public_route"

        add_forwarding(headers, request, route, parts.trusted_proxies, record.request_id)

        upstream_started = time.perf_counter()
        with span("upstream", client=True) as upstream:
            if upstream is not None:
                upstream.trace.inject(headers)  # the upstream's parent: this span
            response = await self.forwarder.forward(
                request, route, path, query, headers, response_headers
            )
        self.metrics.observe_upstream(route.name, time.perf_counter() - upstream_started)
        return response

    def _would_deny(
        self,
        route: Route,
        record: RequestRecord,
        denial: GatewayError,
        headers: CIMultiDict[str],
    ) -> None:
        record.decision, record.reason = "would_deny", denial.reason
        self.metrics.would_deny.labels(route.name, denial.reason).inc()
        headers[SHADOW_DECISION] = f"deny; reason={denial.reason}"

    def _key(
        self, request: web.BaseRequest, record: RequestRecord, parts: Components, *, shadow: bool
    ) -> str:
        """The request's key; a missing or malformed one is refused (and audited)."""
        try:
            key = parts.extractor.extract(request.headers)
            if key is None:
                raise MissingKey(
                    f"No API key: send {parts.extractor.describe()}",
                    headers={hdrs.WWW_AUTHENTICATE: parts.www_authenticate},
                )
        except GatewayError as exc:
            self._audit_auth(record, exc, shadow=shadow)
            raise
        return key

    def _audit_auth(
        self, record: RequestRecord, denial: GatewayError | None, *, shadow: bool
    ) -> None:
        if denial is None:
            self.audit.auth(record, decision="allow", reason=None)
            return
        if shadow and denial.status in SHADOW_STATUSES:
            decision = "would_deny"
        else:
            decision = "error" if denial.status >= 500 else "deny"
        self.audit.auth(record, decision=decision, reason=denial.reason)

    async def _resolve(self, key: str, record: RequestRecord, parts: Components) -> Resolved:
        """A lookup that may reach the tower, through the failed-authentication throttle."""
        guard = parts.config.credentials
        with self.failures.attempt(record.client, guard.failed_auth_per_minute):
            try:
                if not key_shape_ok(key, guard.key_format):
                    # Not a key the tower could have issued: refused without asking it.
                    raise InvalidKey("Invalid API key", reason="invalid_key")
                return await self.resolver.resolve(key)
            except InvalidKey as exc:
                exc.headers = {hdrs.WWW_AUTHENTICATE: parts.www_authenticate}
                raise

    async def authorize(
        self,
        key: str,
        route: Route,
        record: RequestRecord,
        response_headers: dict[str, str],
        *,
        parts: Components | None = None,
        shadow: bool = False,
    ) -> Authorization:
        """Identity -> grants -> policy -> rate limit -> JWT for one key (HTTP and WebSocket),
        audited. `shadow`: policy denials are returned in `would_deny` instead of raised."""
        parts = parts if parts is not None else self.components
        try:
            with span("identity lookup") as lookup:
                # A fresh cached identity cannot be a guessed key: only lookups that may
                # reach the tower (or a cached refusal) go through the throttle.
                resolved = self.resolver.fresh_hit(key)
                if resolved is None:
                    resolved = await self._resolve(key, record, parts)
                if lookup is not None:
                    lookup.set("tower_gateway.cache", resolved.source)
            identity = resolved.identity
            record.identify(self.fingerprint(resolved), identity)
            grants = parts.mapper.grants(identity)
            record.role = grants.role
            would_deny: GatewayError | None = None
            missing = grants.missing(route.require)
            if missing is not None:
                record.missing = missing
                would_deny = Forbidden(f"Missing required capability: {missing}")
                if not shadow:
                    raise would_deny
            default_limit = parts.config.rate_limit.default_per_minute
            if self.limiter is not None and (identity.rate_limit is not None or default_limit > 0):
                per_minute = effective_limit(identity.rate_limit, default_limit)
                if per_minute is not None:
                    decision = await self.limiter.hit(resolved.digest.hex(), per_minute)
                    response_headers.update(decision.headers())
                    if not decision.allowed:
                        limited = RateLimited("Rate limit exceeded", headers=decision.headers())
                        if not shadow:
                            self.metrics.rate_limited.inc()
                            raise limited
                        would_deny = would_deny or limited
            record.decision, record.reason = "allow", resolved.source
            token = self.minter.token_for(resolved.digest, identity, grants, route.audience)
            authorization = Authorization(resolved, grants, token, would_deny)
        except GatewayError as exc:
            self._audit_auth(record, exc, shadow=shadow)
            raise
        self._audit_auth(record, authorization.would_deny, shadow=shadow)
        return authorization


GATEWAY: Final[web.AppKey[Gateway]] = web.AppKey("gateway", Gateway)


def client_address(request: web.BaseRequest, trusted: tuple[IPNetwork, ...]) -> str | None:
    """Who sent the request: the peer, or, while the peer is a trusted proxy, the address
    that proxy reported: the rightmost untrusted one of `X-Forwarded-For` + peer. A value
    that is not an address ends the walk: a client can write anything left of its proxy."""
    remote = request.remote
    if not trusted or remote is None:
        return remote
    chain = [
        part.strip()
        for value in request.headers.getall("X-Forwarded-For", ())
        for part in value.split(",")
    ]
    current = remote
    for candidate in [remote, *reversed(chain)]:
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            return current
        current = candidate
        if not any(address in net for net in trusted):
            return current
    return current


def _is_upgrade(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get(hdrs.UPGRADE)
    return upgrade is not None and upgrade.lower() == "websocket"


def _has_query_key(query: str) -> bool:
    # `;` separates pairs too for some frameworks, so it is a separator here.
    for pair in re.split(r"[&;]", query):
        name = _NAME_NOISE.sub("", unquote_plus(pair.split("=", 1)[0]).lower())
        if name in QUERY_KEY_PARAMS:
            return True
    return False
