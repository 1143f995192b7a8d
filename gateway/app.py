"""The composition root: one `Gateway` per config builds the parts and wires them together.

It owns no request logic. Each consumer gets the narrow collaborators it needs:
the proxy listener the decision engine and the forwarder, the WebSocket
handshake the engine, the socket registry and the session pool, the ops
listener readiness, a revoker, the reloader and explain. Each long-lived
resource (the tower client, Redis and the replicas, the rate limiter, the
upstream sessions, the log writers) has its own cleanup context, so one that
fails to close still lets the others close.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Final

import redis.asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.auth.clientguard import FailureThrottle
from gateway.auth.components import Components, build_components
from gateway.auth.decide import DecisionEngine
from gateway.auth.fingerprint import Fingerprinter, derive_secret
from gateway.auth.identity import CacheStats, IdentityResolver
from gateway.auth.quota import quota_counter
from gateway.auth.ratelimit import MemoryRateLimiter, RateLimiter
from gateway.auth.ratelimit_batched import BatchedRateLimiter
from gateway.auth.ratelimit_exact import RedisRateLimiter
from gateway.auth.tokens import SigningKey, TokenMinter, load_signing_key, private_material
from gateway.config import Config
from gateway.http.server import ANSWER, TIMEOUTS, Timeouts, listener_app
from gateway.ops.accesslog import AccessLog
from gateway.ops.audit import AuditLog
from gateway.ops.explain import Explainer
from gateway.ops.keys_api import local_store
from gateway.ops.listener import create_ops_app
from gateway.ops.metrics import Metrics
from gateway.ops.parts import OpsParts, Readiness
from gateway.ops.reload import Reloader
from gateway.proxy.forwarder import Forwarder
from gateway.proxy.listener import ProxyListener, http_log
from gateway.replicas.connection import op_timeout, redis_client
from gateway.replicas.pool import PoolCollector
from gateway.replicas.revoker import Revoker
from gateway.replicas.shared import LOCK_MARGIN, Replicas
from gateway.tower import Tower
from gateway.tower.usage import UsageRecorder, UsageReporter, usage_sender
from gateway.websocket.handshake import WebSockets
from gateway.websocket.registry import SocketRegistry

if TYPE_CHECKING:
    from gateway.ops.otlp import OtlpSpans


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


class Gateway:
    """The gateway for one config: builds its parts, and its applications from them."""

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
            from gateway.ops.otlp import OtlpSpans  # the SDK is imported only when spans are on

            self.spans = OtlpSpans(config.tracing, self.registry)
        self.components: Components = build_components(config)
        self.replicas: Replicas | None = None
        self._redis: redis.asyncio.Redis | None = None
        if config.redis.url:
            self.redis_ok = self._redis_ok  # only with Redis: readiness then reports it
            self.registry.register(PoolCollector(lambda: self._redis))
        self.sockets = SocketRegistry(self.metrics, drain_timeout=config.server.shutdown_timeout)
        self.revoker = Revoker(resolver=self.resolver, minter=self.minter, sockets=self.sockets)
        self.engine = DecisionEngine(
            components=self._components,
            resolver=self.resolver,
            minter=self.minter,
            fingerprinter=self.fingerprinter,
            # Per process, like the memory rate limiter; kept across config reloads.
            failures=FailureThrottle(),
            metrics=self.metrics,
            audit=audit if audit is not None else AuditLog.from_config(config),
            clock=clock,
        )
        self.listener = ProxyListener(
            components=self._components,
            engine=self.engine,
            forwarder=self.forwarder,
            metrics=self.metrics,
            access_log=access_log if access_log is not None else AccessLog.from_config(config),
        )
        self.usage: UsageRecorder | None = None
        if config.tower.usage_report is not None:
            self.usage = UsageRecorder(max_keys=config.tower.usage_report.max_keys, clock=clock)
            self.listener.usage = self.usage
            self.metrics.usage_dropped.set_function(lambda: self.usage.dropped if self.usage else 0)
        self.listener.spans = self.spans
        self.listener.websockets = WebSockets(
            engine=self.engine, registry=self.sockets, sessions=self.forwarder.session
        )
        self.metrics.watch(self._stats)
        self.metrics.watch_logs(
            lambda: {"access": self.access_log.dropped, "audit": self.audit.dropped}
        )
        self.reloader = Reloader(
            config.source,
            current=self._current_config,
            apply=self.apply_config,
            signing_key=self._signing_key,
            rotate_key=self.rotate_signing_key,
            reopen_logs=self._reopen_logs,
            audit=self._audit,
            metrics=self.metrics,
        )

    # ------------------------------------------------------------------ the parts' views

    def _components(self) -> Components:
        return self.components

    def _current_config(self) -> Config:
        return self.components.config

    def _audit(self) -> AuditLog:
        return self.engine.audit

    @property
    def access_log(self) -> AccessLog:
        return self.listener.access_log

    @access_log.setter
    def access_log(self, log: AccessLog) -> None:
        self.listener.access_log = log

    @property
    def audit(self) -> AuditLog:
        return self.engine.audit

    @audit.setter
    def audit(self, log: AuditLog) -> None:
        self.engine.audit = log

    @property
    def limiter(self) -> RateLimiter | None:
        return self.engine.limiter

    def _reopen_logs(self) -> None:
        self.access_log.reopen()
        self.audit.reopen()

    def _signing_key(self) -> SigningKey:
        return self.signing_key

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

    def rotate_signing_key(self, key: SigningKey, config: Config) -> None:
        """Sign new tokens with `key` at once (a reload found a new key file or secret)."""
        self.signing_key = key
        self.minter.rotate(key, config.jwt)

    def apply_config(self, config: Config) -> None:
        """Swap in a reloaded config (`gateway.ops.reload`): one assignment, so a request that
        read `components` before it keeps all of the old, and one after gets all of the new."""
        self.components = build_components(config)
        self.config = config

    # ------------------------------------------------------------------ revocation

    def invalidate_key_id(self, key_id: str) -> int:
        return self.revoker.invalidate_key_id(key_id)

    async def revoke_key_ids(self, key_ids: Sequence[str]) -> int:
        return await self.revoker.revoke_key_ids(key_ids)

    async def revoke_all(self) -> None:
        await self.revoker.revoke_all()

    def forget_locally(self, key_ids: Sequence[str] | None) -> int:
        return self.revoker.forget_locally(key_ids)

    async def _redis_ok(self) -> bool:
        return self.replicas is not None and await self.replicas.ping()

    # ------------------------------------------------------------------ lifecycle

    async def _tower_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        start = getattr(self.tower, "start", None)
        if start is not None:
            await start()
        yield
        await self.tower.close()

    async def _replicas_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        if not self.config.redis.url:
            yield
            return
        tower = self.config.tower
        self._redis = redis_client(
            self.config.redis.url,
            max_connections=self.config.redis.max_connections,
            pool_timeout=self.config.redis.pool_timeout,
        )
        self.replicas = Replicas(
            self._redis,
            prefix=self.config.redis.key_prefix,
            config=self.config.cache,
            keys=self._shared_secrets(),
            # One tower call (all its retries) plus a margin.
            lock_ttl=(tower.budget or tower.timeout) + LOCK_MARGIN,
            forget=self.revoker.forget_locally,
            drop_cache=self.revoker.drop_cache,
            on_error=lambda op: self.metrics.redis_errors.labels(op).inc(),
            clock=self.clock,
        )
        self.resolver.shared = self.replicas.cache
        self.revoker.replicas = self.replicas
        self.replicas.start()
        try:
            yield
        finally:
            try:
                await self.replicas.close()
            finally:
                await self._redis.aclose()

    async def _limiter_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        settings = self.config.rate_limit
        limiter: RateLimiter
        on_error = self.metrics.redis_errors.labels
        if settings.backend == "redis" and self._redis is not None and settings.mode == "batched":
            batched = BatchedRateLimiter(
                self._redis,
                prefix=self.config.redis.key_prefix,
                burst=settings.burst,
                sync_interval=settings.sync_interval,
                on_fallback=self.metrics.rate_limit_fallbacks.inc,
                on_error=lambda op: on_error(op).inc(),
                timeout=op_timeout(self._redis),
            )
            batched.start()  # the first settle tells it how many processes share
            limiter = batched
        elif settings.backend == "redis" and self._redis is not None:
            limiter = RedisRateLimiter(
                self._redis,
                prefix=self.config.redis.key_prefix,
                burst=settings.burst,
                fallback=MemoryRateLimiter(burst=settings.burst),
                on_fallback=self.metrics.rate_limit_fallbacks.inc,
                on_error=lambda op: on_error(op).inc(),
                timeout=op_timeout(self._redis),
            )
        else:
            limiter = MemoryRateLimiter(burst=settings.burst)
        self.engine.limiter = limiter
        self.engine.quotas = quota_counter(
            self._redis if settings.backend == "redis" else None,
            prefix=self.config.redis.key_prefix,
            clock=self.clock,
            on_fallback=self.metrics.quota_fallbacks.inc,
            timeout=op_timeout(self._redis) if self._redis is not None else 0.25,
        )
        yield
        await limiter.close()

    async def _usage_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        settings = self.config.tower.usage_report
        if settings is None or self.usage is None:
            yield
            return
        send, close = usage_sender(self.config.tower, getattr(self.tower, "store", None))
        reporter = UsageReporter(
            self.usage,
            send,
            interval=settings.interval,
            on_result=lambda ok: self.metrics.usage_reports.labels("ok" if ok else "failed").inc(),
        )
        reporter.start()
        yield
        try:
            await reporter.close()
        finally:
            await close()

    async def _forwarder_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        yield
        await self.forwarder.close()

    async def _resolver_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        yield
        await self.resolver.close()  # background refreshes still running

    async def _spans_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        yield
        if self.spans is not None:
            await asyncio.to_thread(self.spans.shutdown)  # the last batch, bounded

    async def _logs_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        yield
        try:
            self.access_log.close()
        finally:
            self.audit.close()

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
        # Entered in this order, left in the reverse one, each whatever the others do.
        app.cleanup_ctx.extend(
            [
                self._logs_ctx,
                self._spans_ctx,
                self._tower_ctx,
                self._resolver_ctx,
                self._replicas_ctx,
                self._limiter_ctx,
                self._usage_ctx,
                self._forwarder_ctx,
            ]
        )
        app.on_shutdown.append(self.sockets.on_shutdown)
        # Every request, whatever its path or method, goes to the listener: served by
        # `GatewayRunner` (as `serve` and `demo` do), the app has no routes of its own.
        app[ANSWER] = self.listener.handle
        return app

    def ops_app(self) -> web.Application:
        readiness = Readiness(
            self.tower.ping,
            lambda: self.resolver.entry_counts()[0],
            redis_ok=self._redis_ok if self.config.redis.url else None,
        )
        ops = create_ops_app(
            OpsParts(
                registry=self.registry,
                readiness=readiness,
                jwks=self.minter.jwks,
                audit=self._audit,
                resolver=self.resolver,
                revoker=self.revoker,
                reloader=self.reloader,
                explainer=Explainer(self.engine),
                config=self._current_config,
                admin=self.config.admin,
                key_store=local_store(self.tower),
            )
        )
        return listener_app(ops, self.config.server)


GATEWAY: Final[web.AppKey[Gateway]] = web.AppKey("gateway", Gateway)
