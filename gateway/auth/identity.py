"""Key -> Identity: a TTL cache with single flight, refresh ahead and stale serving in front
of the tower.

Entries are keyed by a keyed hash of the key (never the key itself). A positive
entry is fresh for `min(cache.ttl, expires_at - now)`; in the last
`cache.refresh_ahead` part of that life, a request that uses it is answered from
it and starts a background refresh (one per key at a time). Once stale, an entry
may be served until `cache.stale_if_error` more seconds have passed, never past
`expires_at`, while its refresh is in flight or the tower fails or is slow:

    fresh            hit
    refresh window   hit, and a background refresh unless one is in flight
    stale            served at once while a refresh is in flight, a recent one failed or
                     the tower's last call failed or was too slow; otherwise a refresh
                     starts and the request waits for it up to `cache.refresh_wait`,
                     then is served stale
    past stale       a miss: the request waits for the tower (single flight)

So a key in use never waits for the tower, and an idle key waits for a tower
that answers quickly: its refusal (revoked, expired) wins over the entry, which
it removes at once, as do an admin drop and a pushed revocation.
Negative entries live in their own bounded cache, so a flood of random keys can
only push out other negative entries. The cache stores who the key belongs to,
never a decision: policy is checked on every request by the caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any, Final

from cachetools import TTLCache

from gateway.auth.entries import (
    CacheStats,
    Entry,
    Fetch,
    PositiveCache,
    Resolved,
    SharedEntry,
    SharedLevel,
    entry_bounds,
)
from gateway.auth.fingerprint import Fingerprinter
from gateway.config import CacheConfig
from gateway.errors import InvalidKey, TowerFault, TowerUnavailable
from gateway.tower import Identity, Rejection, Tower
from gateway.tracing import span

log = logging.getLogger("tower_gateway.identity")

RETRY_AFTER_SECONDS: Final = "5"
# After a failed refresh, the entry is served as it is this long before a request starts
# another: the breaker fails those fast anyway, but a task per request is waste.
REFRESH_RETRY_SECONDS: Final = 1.0
_DETAILS: Final = {
    "invalid_key": "Invalid API key",
    "expired_key": "API key has expired",
    "revoked_key": "API key has been revoked",
}


# Defined in gateway.auth.entries; most callers know them from here.
__all__ = [
    "CacheStats",
    "Fetch",
    "IdentityResolver",
    "Resolved",
    "SharedEntry",
    "SharedLevel",
    "entry_bounds",
]

TowerObserver = Callable[[str, float], None]


class IdentityResolver:
    """Resolves keys to identities; one tower call per uncached key at a time."""

    def __init__(
        self,
        tower: Tower,
        config: CacheConfig,
        fingerprinter: Fingerprinter,
        *,
        clock: Callable[[], float] = time.time,
        on_tower_call: TowerObserver | None = None,
        shared: SharedLevel | None = None,
    ) -> None:
        self.tower = tower
        self.fingerprinter = fingerprinter
        self.stats = CacheStats()
        self._config = config
        self._clock = clock
        self._on_tower_call = on_tower_call
        self._positive = PositiveCache(config.max_entries, clock, self.stats)
        self._negative: TTLCache[bytes, str] | None = (
            TTLCache(config.max_entries, config.negative_ttl, timer=clock)
            if config.negative_ttl > 0
            else None
        )
        self._inflight: dict[bytes, asyncio.Future[Identity | Rejection]] = {}
        # Every tower lookup still running, including those a drop took out of `_inflight`
        # and background refreshes nobody awaits: cancelled by `close`.
        self._tasks: set[asyncio.Future[Identity | Rejection]] = set()
        # The last tower call failed, or a request gave up waiting for one; the next answer
        # clears it. A stale entry is then served without waiting.
        self._tower_failing = False
        # Bumped by every admin drop: an answer fetched before the drop may predate
        # a revocation, so it is handed to its waiters but never cached.
        self._generation = 0
        self.last_tower_ok: float | None = None
        # Set once before serving (the Redis client exists only after Gateway.start()).
        self.shared = shared

    # ------------------------------------------------------------------ hot path

    def fresh_hit(self, api_key: str) -> Resolved | None:
        """The key's fresh cached identity, or None: no tower call, no miss counted.

        Lets callers skip work that only matters when the tower must be asked
        (the per-address throttle on failed authentications).
        """
        digest = self.fingerprinter.digest(api_key)
        now = self._clock()
        entry = self._positive.fresh(digest, now)
        if entry is None:
            return None
        if now < entry.fresh_until and not entry.identity.expired(now):
            self.stats.hits += 1
            if now >= entry.refresh_at:
                self._refresh(api_key, digest)
            return Resolved(entry.identity, digest, "hit")
        return None

    async def resolve(self, api_key: str) -> Resolved:
        digest = self.fingerprinter.digest(api_key)
        now = self._clock()
        entry = self._positive.get(digest)
        if entry is not None:
            if entry.identity.expired(now):
                self._drop(digest)
                raise InvalidKey(_DETAILS["expired_key"], reason="expired_key")
            if now < entry.fresh_until:
                self.stats.hits += 1
                if now >= entry.refresh_at:
                    self._refresh(api_key, digest)
                return Resolved(entry.identity, digest, "hit")
            return await self._stale(api_key, digest, entry, now)
        elif self._negative is not None:
            reason = self._negative.get(digest)
            if reason is not None:
                self.stats.hits += 1
                self.stats.negative_hits += 1
                raise InvalidKey(_DETAILS[reason], reason=reason)
        self.stats.misses += 1
        return await self._from_tower(api_key, digest)

    # ------------------------------------------------------------------ refresh

    def _refresh(self, api_key: str, digest: bytes) -> asyncio.Future[Identity | Rejection]:
        """The key's tower lookup in flight, started in the background if there is none."""
        future = self._inflight.get(digest)
        if future is None:
            self.stats.refreshes += 1
            future = self._start(api_key, digest)
        return future

    async def _stale(self, api_key: str, digest: bytes, entry: Entry, now: float) -> Resolved:
        """A stale entry (inside its stale window): served unless a quick tower says otherwise."""
        stale = Resolved(entry.identity, digest, "stale")
        # Served without waiting, a stale entry is a hit: the request never saw the tower.
        if digest in self._inflight or now < entry.refresh_at:
            self.stats.hits += 1  # being refreshed, or a refresh just failed
            self.stats.stale_serves += 1
            return stale
        future = self._refresh(api_key, digest)
        if self._tower_failing or self._config.refresh_wait <= 0:
            self.stats.hits += 1
            self.stats.stale_serves += 1
            return stale
        self.stats.misses += 1
        self.stats.tower_waits += 1
        try:
            async with asyncio.timeout(self._config.refresh_wait):
                answer = await asyncio.shield(future)
        except TimeoutError:
            # A slow tower: the refresh goes on in the background, and until the tower
            # answers again other stale entries are served without waiting.
            self._tower_failing = True
            self.stats.stale_serves += 1
            return stale
        except TowerFault as fault:
            return self._stale_or_fail(digest, fault)
        if isinstance(answer, Rejection):
            raise InvalidKey(_DETAILS[answer.reason], reason=answer.reason)
        return Resolved(answer, digest, "tower")

    # ------------------------------------------------------------------ misses

    def _start(self, api_key: str, digest: bytes) -> asyncio.Future[Identity | Rejection]:
        future = asyncio.ensure_future(self._load(api_key, digest))
        self._inflight[digest] = future
        self._tasks.add(future)
        future.add_done_callback(lambda f: self._settled(digest, f))
        return future

    async def _from_tower(self, api_key: str, digest: bytes) -> Resolved:
        self.stats.tower_waits += 1
        future = self._inflight.get(digest)
        if future is None:
            future = self._start(api_key, digest)
        else:
            self.stats.waiters += 1
        try:
            # shield: a cancelled first caller must not cancel the call the
            # other waiters depend on.
            answer = await asyncio.shield(future)
        except TowerFault as fault:
            return self._stale_or_fail(digest, fault)
        if isinstance(answer, Rejection):
            raise InvalidKey(_DETAILS[answer.reason], reason=answer.reason)
        return Resolved(answer, digest, "tower")

    def _settled(self, digest: bytes, future: asyncio.Future[Any]) -> None:
        self._tasks.discard(future)
        if self._inflight.get(digest) is future:
            del self._inflight[digest]
            if not future.cancelled() and future.exception() is not None:
                self._refresh_failed(digest)
        if not future.cancelled():
            future.exception()  # retrieved: no "never retrieved" noise if all callers left

    def _refresh_failed(self, digest: bytes) -> None:
        """Serve the entry as it is for a while before another refresh is tried."""
        entry = self._positive.get(digest)
        if entry is not None:
            retry_at = self._clock() + REFRESH_RETRY_SECONDS
            self._positive[digest] = replace(entry, refresh_at=retry_at)

    async def close(self) -> None:
        """Cancel the tower lookups still running (background refreshes among them)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _load(self, api_key: str, digest: bytes) -> Identity | Rejection:
        """A local miss: what another replica shared, else one tower call for all replicas."""
        if self.shared is None:
            return await self._fetch(api_key, digest)
        generation = self._generation
        with span("redis shared cache", client=True):
            found = await self.shared.load(digest, lambda: self._fetch(api_key, digest, generation))
        if not isinstance(found, SharedEntry):
            return found  # from `_fetch`, which stored it here already
        answer = found.answer
        if generation != self._generation:
            pass  # an admin drop happened meanwhile: hand it to the waiters, cache nothing
        elif isinstance(answer, Rejection):
            self._drop(digest)
            if self._negative is not None:
                self._negative[digest] = answer.reason
        else:
            # The shared bounds, not fresh ones: a copy must not outlive the original.
            self._store(digest, answer, self._clock(), (found.fresh_until, found.stale_until))
        if found.fault is not None:
            raise found.fault  # the tower failed: the caller serves this entry as stale
        self.stats.shared_hits += 1
        return answer

    async def _fetch(
        self, api_key: str, digest: bytes, generation: int | None = None
    ) -> Identity | Rejection:
        generation = self._generation if generation is None else generation
        started = time.perf_counter()
        self.stats.tower_calls += 1
        try:
            answer = await self.tower.validate(api_key)
        except TowerFault as fault:
            self._tower_failing = True
            self._observe(fault.kind, started)
            # An open breaker fails every uncached lookup on purpose; the
            # metrics count those, one warning per request would drown the log.
            level = logging.DEBUG if fault.kind == "circuit_open" else logging.WARNING
            log.log(level, "tower fault (%s): %s", fault.kind, fault.detail)
            raise
        except Exception as exc:
            # A bug or an unexpected library error is still never a valid key.
            self._tower_failing = True
            self._observe("error", started)
            log.exception("tower client failed")
            raise TowerFault("error", type(exc).__name__) from None
        now = self._clock()
        self.last_tower_ok = now
        self._tower_failing = False
        if isinstance(answer, Identity) and answer.expired(now):
            # The tower judged expiry at its own time; by this gateway's clock
            # (skew, or a slow answer) the key has already expired.
            answer = Rejection("expired_key")
        if generation != self._generation:
            self._observe(answer.reason if isinstance(answer, Rejection) else "valid", started)
        elif isinstance(answer, Rejection):
            self._drop(digest)
            if self._negative is not None:
                self._negative[digest] = answer.reason
            self._observe(answer.reason, started)
        else:
            self._store(digest, answer, now)
            self._observe("valid", started)
        return answer

    def _observe(self, outcome: str, started: float) -> None:
        if self._on_tower_call is not None:
            self._on_tower_call(outcome, time.perf_counter() - started)

    def _stale_or_fail(self, digest: bytes, fault: TowerFault) -> Resolved:
        now = self._clock()
        entry = self._positive.get(digest)
        if entry is not None and now < entry.stale_until and not entry.identity.expired(now):
            self.stats.stale_serves += 1
            return Resolved(entry.identity, digest, "stale")
        raise TowerUnavailable(
            "the key service is unavailable", headers={"Retry-After": RETRY_AFTER_SECONDS}
        ) from fault

    # ------------------------------------------------------------------ storage

    def _store(
        self,
        digest: bytes,
        identity: Identity,
        now: float,
        bounds: tuple[float, float] | None = None,
    ) -> None:
        fresh_until, stale_until = bounds or entry_bounds(identity, now, self._config)
        if stale_until <= now:
            return
        if self._negative is not None:
            self._negative.pop(digest, None)
        # A shared copy may come with little fresh life left: its refresh is due in the same
        # proportion, so a replica asks Redis again a few times at most before a lead refreshes.
        refresh_at = fresh_until - self._config.refresh_ahead * max(0.0, fresh_until - now)
        if identity.expires_at is not None and fresh_until >= identity.expires_at:
            refresh_at = fresh_until  # its expiry ends it: no answer could make it live longer
        self._positive[digest] = Entry(identity, fresh_until, stale_until, refresh_at)

    def _drop(self, digest: bytes) -> None:
        self._positive.pop(digest, None)

    # ------------------------------------------------------------------ admin

    def invalidate_key_ids(self, key_ids: Collection[str]) -> set[bytes]:
        """Drop every entry of these key_ids; returns the digests dropped.

        One pass over the cache (about 20 ms at 100k identities) instead of a
        key_id index: revocations are rare, and an index would cost ~150 bytes
        for every cached identity.
        """
        self._forget_inflight()
        wanted = set(key_ids)
        digests = {d for d, entry in self._positive.live() if entry.identity.key_id in wanted}
        for digest in digests:
            self._positive.pop(digest, None)
        return digests

    def _forget_inflight(self) -> None:
        # Requests after a drop ask the tower afresh instead of joining a call
        # that began before it.
        self._generation += 1
        self._inflight.clear()

    def clear(self) -> None:
        self._forget_inflight()
        self._positive.clear()
        if self._negative is not None:
            self._negative.clear()

    def entry_counts(self) -> tuple[int, int]:
        """(positive, negative) entries, without walking them."""
        return len(self._positive), len(self._negative) if self._negative is not None else 0

    def find_fingerprint(self, fingerprint: str) -> bytes | None:
        """The cached digest whose short fingerprint this is (`Fingerprinter.short`).

        A scan, not an index: it serves the admin `explain` endpoint only, and an
        index would cost memory for every cached identity (~150 bytes each).
        """
        try:
            prefix = bytes.fromhex(fingerprint)
        except ValueError:
            return None
        if len(prefix) != 8:
            return None
        for digest, _entry in self._positive.live():
            if digest[:8] == prefix:
                return digest
        return None

    def peek(self, digest: bytes) -> Identity | None:
        entry = self._positive.get(digest)
        return entry.identity if entry is not None else None

    def sizes(self) -> tuple[int, int, int]:
        """(positive entries, fresh positive entries, negative entries)."""
        now = self._clock()
        positive = [entry for _, entry in self._positive.live()]
        fresh = sum(1 for e in positive if now < e.fresh_until and not e.identity.expired(now))
        negative = len(self._negative) if self._negative is not None else 0
        return len(positive), fresh, negative

    def snapshot(self) -> dict[str, Any]:
        total, valid, negative = self.sizes()
        s = self.stats
        return {
            "total_cached_keys": total + negative,
            "valid_cached_keys": valid,
            "negative_cached_keys": negative,
            "cache_hit_ratio": round(s.hit_ratio, 6),
            "hits": s.hits,
            "misses": s.misses,
            "negative_hits": s.negative_hits,
            "stale_serves": s.stale_serves,
            "evictions": s.evictions,
            "single_flight_waiters": s.waiters,
            "tower_calls": s.tower_calls,
            "shared_hits": s.shared_hits,
            "refreshes": s.refreshes,
            "tower_waits": s.tower_waits,
            "max_entries": self._config.max_entries,
        }
