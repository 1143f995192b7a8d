"""The identity cache's entries: their bounds, the LRU that holds them, what a lookup returns.

`IdentityResolver` (gateway.auth.identity) decides when an entry is fresh, refreshed or
served stale; this module only stores entries and their deadlines.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cachetools import Cache, LRUCache

from gateway.config import CacheConfig
from gateway.errors import TowerFault
from gateway.tower import Identity, Rejection


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    negative_hits: int = 0
    stale_serves: int = 0
    evictions: int = 0
    waiters: int = 0
    tower_calls: int = 0
    shared_hits: int = 0
    refreshes: int = 0  # refreshes started in the background (ahead of expiry, or stale)
    tower_waits: int = 0  # lookups that waited for a tower call (or for a shared replica's)

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(frozen=True, slots=True)
class Entry:
    identity: Identity
    fresh_until: float
    stale_until: float
    # A request from this time on starts a refresh (if none is in flight): inside the fresh
    # life when refreshing ahead; moved on by REFRESH_RETRY_SECONDS after a failed refresh.
    refresh_at: float


@dataclass(frozen=True, slots=True)
class Resolved:
    identity: Identity
    digest: bytes
    source: str  # "hit" | "tower" | "stale"


@dataclass(frozen=True, slots=True)
class SharedEntry:
    """An answer read from the level replicas share: an identity with its bounds, or a refusal
    (whose bounds are its expiry). `fault` is set when the entry is stale and the tower has just
    failed, so the caller may serve it under stale-if-error."""

    answer: Identity | Rejection
    fresh_until: float
    stale_until: float
    fault: TowerFault | None = None


Fetch = Callable[[], Awaitable[Identity | Rejection]]


class SharedLevel(Protocol):
    """A cache level shared by replicas, between this process's cache and the tower
    (`gateway.replicas.shared`). It never fails for its own faults: without it, `fetch` answers."""

    async def load(self, digest: bytes, fetch: Fetch) -> SharedEntry | Identity | Rejection:
        """A shared entry, or the answer of `fetch` (called at most once, then shared)."""
        ...


def entry_bounds(identity: Identity, now: float, config: CacheConfig) -> tuple[float, float]:
    """(fresh_until, stale_until) of a positive entry stored at `now`; never past expires_at."""
    limit = identity.expires_at if identity.expires_at is not None else float("inf")
    fresh_until = min(now + config.ttl, limit)
    return fresh_until, min(fresh_until + config.stale_if_error, limit)


class PositiveCache(LRUCache[bytes, Entry]):
    """LRU-bounded identities whose entries carry their own deadlines.

    An `LRUCache` plus a deadline check on read costs about a third of the
    memory of cachetools' `TLRUCache` (no heap, no per-item link objects) and
    reads faster; an entry past its `stale_until` reads as absent and is
    dropped. Counts LRU evictions (expiry is not an eviction).
    """

    def __init__(self, maxsize: int, timer: Callable[[], float], stats: CacheStats) -> None:
        super().__init__(maxsize)
        self._timer = timer
        self._stats = stats

    def __getitem__(self, key: bytes) -> Entry:
        entry = super().__getitem__(key)
        if self._timer() >= entry.stale_until:
            super().__delitem__(key)
            raise KeyError(key)
        return entry

    def get(self, key: bytes, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def fresh(self, key: bytes, now: float) -> Entry | None:
        """`get` for the hot path: one call, the LRU order touched, a dead entry dropped."""
        try:
            entry: Entry = LRUCache.__getitem__(self, key)
        except KeyError:
            return None
        if now >= entry.stale_until:
            LRUCache.__delitem__(self, key)
            return None
        return entry

    def popitem(self) -> tuple[bytes, Entry]:
        item = super().popitem()
        self._stats.evictions += 1
        return item

    def live(self) -> list[tuple[bytes, Entry]]:
        """Entries not past their deadline, without touching the LRU order."""
        now = self._timer()
        out = []
        for key in list(Cache.__iter__(self)):
            entry: Entry = Cache.__getitem__(self, key)
            if now < entry.stale_until:
                out.append((key, entry))
        return out
