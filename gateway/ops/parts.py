"""What the ops listener reaches (`OpsParts`), handed in by the composition root, and the
readiness probe it answers `/readyz` with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry

from gateway.auth.identity import IdentityResolver
from gateway.config import AdminConfig, Config
from gateway.ops.audit import AuditLog
from gateway.ops.explain import Explainer
from gateway.ops.reload import Reloader
from gateway.tower.store import KeyStore

READY_CACHE_SECONDS: Final = 2.0
PING_TIMEOUT: Final = 2.0


class Revocations(Protocol):
    async def revoke_key_ids(self, key_ids: Sequence[str]) -> int: ...

    async def revoke_all(self) -> None: ...


class Readiness:
    """Tower reachability, probed at most every couple of seconds, and what else can serve."""

    def __init__(
        self,
        tower_ping: Callable[[], Awaitable[bool]],
        cached_identities: Callable[[], int],
        *,
        redis_ok: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._ping = tower_ping
        self._cached = cached_identities
        self._redis_ok = redis_ok
        self._checked_at = 0.0
        self._tower_ok = False
        self._lock = asyncio.Lock()

    async def tower_ok(self) -> bool:
        async with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= READY_CACHE_SECONDS:
                try:
                    async with asyncio.timeout(PING_TIMEOUT):
                        self._tower_ok = await self._ping()
                except TimeoutError:
                    self._tower_ok = False
                self._checked_at = now
            return self._tower_ok

    async def report(self) -> tuple[bool, dict[str, Any]]:
        tower_ok = await self.tower_ok()
        positive = self._cached()
        checks: dict[str, Any] = {
            "config": True,
            "tower": tower_ok,
            "cache_can_serve": positive > 0,
        }
        ready = tower_ok or positive > 0
        redis_ping = self._redis_ok
        if redis_ping is not None:
            # Reported, not required: without Redis every replica still serves
            # (local cache, local rate limits), so an outage of Redis must not
            # pull all of them out of the load balancer at once.
            checks["redis"] = await redis_ping()
        return ready, checks


@dataclass(frozen=True, slots=True)
class OpsParts:
    """What the ops listener reaches, handed in by the composition root."""

    registry: CollectorRegistry
    readiness: Readiness
    jwks: Callable[[], Mapping[str, Any]]
    audit: Callable[[], AuditLog]  # the audit log in use
    resolver: IdentityResolver  # the cache, for its stats
    revoker: Revocations
    reloader: Reloader
    explainer: Explainer
    config: Callable[[], Config]  # the config in effect
    admin: AdminConfig  # as started: a reload does not change it
    key_store: KeyStore | None = None  # the embedded tower's, for /admin/keys
