"""Redis as the engine replicas share: a second identity-cache level with single flight across
replicas, and instant revocation (shared deletes plus a pub/sub channel every replica follows).

Everything here sits beside the per-process path, never in its way: a Redis error or timeout
makes a replica behave as if there were no Redis (its own cache, the tower, local rate limits),
is counted in `tower_gateway_redis_errors_total{op}`, and is logged at most once every
LOG_INTERVAL seconds. Redis keys, all under `redis.key_prefix`:

    id:<digest hex>    one shared answer, "<fresh_until ms>|<fetched ms>|<mac hex>|<json>";
                       expires at the entry's stale_until (never past the key's expires_at), or
                       after cache.negative_ttl for a refusal. The digest is the keyed hash the
                       local cache uses, never the key; <fetched ms> is Redis's clock when the
                       tower call began; the MAC covers all of it and the digest.
    lock:<digest hex>  the replica calling the tower for that digest (SET NX PX, random token)
    kid:<key_id>       the digests cached for a key_id, so a revocation can find them
    revoked:<key_id>   the revocation's time (Redis's clock, ms), kept as long as any entry
    revoked-all        fetched before it could live: such entries are never read, nor stored
    revocations        the pub/sub channel: "<macs>|<json>", the JSON {"origin", "id", "ts",
                       "at", "key_ids": [...] or "all": true}, signed with the shared secret
    filled             the pub/sub channel on which a lock's holder announces "<digest hex>"
                       once its answer is stored (or its call failed): waiters look at once

Trust: whoever can write to Redis but holds none of the gateway's secrets can delete entries
(more tower calls) and block sharing, but cannot forge an entry, move one to another key,
bring back an entry revoked on a replica that heard the revocation, or send a revocation.
Replicas remember the revocations they heard, so deleting the marker does not help either.
A "filled" message is a hint, not a fact: a forged one costs a waiter one more lookup.

Every process has one pool of `redis.max_connections` connections (`pool`). When all are busy
a call waits up to `redis.pool_timeout` for one; a pool still exhausted then is counted as
`tower_gateway_redis_errors_total{op="pool"}` and that one call goes without Redis, but the
request path keeps using Redis: only a Redis that fails to answer pauses it.

The parts: `connection` (the client, fault handling, signing), `cache` (the shared level),
`bus` (revocation messages) and `webhook` (the tower's `POST /admin/revocations`); `Replicas`
here puts them behind one face for the gateway.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Final

import redis.asyncio

from gateway.config import CacheConfig
from gateway.replicas.bus import Forget, RevocationBus
from gateway.replicas.cache import SharedIdentityCache
from gateway.replicas.connection import (
    ADMIN_OP_TIMEOUT,
    REDIS_FAULTS,
    RedisFaults,
    op_timeout,
)

# The lock outlives one tower call (tower.timeout) by this much.
LOCK_MARGIN: Final = 0.5


# --------------------------------------------------------------------------- the facade


class Replicas:
    """What one Gateway shares with its peers through its Redis client: the identity cache
    level, revocations (shared deletes, then a message) and a health probe."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str,
        config: CacheConfig,
        keys: Sequence[bytes],
        lock_ttl: float,
        forget: Forget,
        drop_cache: Callable[[], object],
        on_error: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._forget = forget
        self._clock = clock
        self.origin = uuid.uuid4().hex
        self.faults = RedisFaults(on_error)
        self.cache = SharedIdentityCache(
            client,
            prefix=prefix,
            config=config,
            keys=keys,
            lock_ttl=lock_ttl,
            faults=self.faults,
            clock=clock,
        )
        self.bus = RevocationBus(
            client,
            channel=prefix + "revocations",
            origin=self.origin,
            apply=forget,
            resync=drop_cache,
            faults=self.faults,
            keys=keys,
            revocations=self.cache.revocations,
            clock=clock,
            filled_channel=self.cache.filled_channel,
            on_filled=self.cache.wake,
        )
        self._pending: set[asyncio.Task[bool]] = set()

    def start(self) -> None:
        self.bus.start()

    async def close(self) -> None:
        if self._pending:
            # Revocations already accepted are still delivered if Redis answers in time.
            await asyncio.wait(self._pending, timeout=ADMIN_OP_TIMEOUT)
        for task in list(self._pending):
            task.cancel()
        await self.bus.close()

    async def revoke(self, key_ids: Sequence[str] | None) -> bool:
        """Mark the revocation and delete the shared entries, drop them here again, then tell
        every replica, this one included (in that order: a request that read the shared entry
        before the marker, and cached it here, loses it again; none can read it after).
        False when Redis could not be told."""
        if key_ids is not None and not key_ids:
            return True
        try:
            at_ms = await self.cache.forget(key_ids)
            ok = True
        except REDIS_FAULTS as exc:
            self.faults.record("revoke", exc)
            # Without Redis's clock, this replica's: the message still drops every copy.
            at_ms, ok = math.floor(self._clock() * 1000), False
        self._forget(key_ids)
        try:
            await self.bus.publish(key_ids, at_ms)
        except REDIS_FAULTS as exc:
            self.faults.record("publish", exc)
            return False
        return ok

    def revoke_soon(self, key_ids: Sequence[str] | None) -> None:
        """`revoke` from synchronous code, in the background."""
        task = asyncio.get_running_loop().create_task(self.revoke(key_ids))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(op_timeout(self._client)):
                return bool(await self._client.ping())
        except REDIS_FAULTS as exc:
            self.faults.record("ping", exc, pause=False)
            return False
