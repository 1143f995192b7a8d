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

Every process has one pool of `redis.max_connections` connections. When all are busy a call
waits up to `redis.pool_timeout` for one; a pool still exhausted then is counted as
`tower_gateway_redis_errors_total{op="pool"}` and that one call goes without Redis, but the
request path keeps using Redis: only a Redis that fails to answer pauses it.

The tower's revocation webhook (`POST /admin/revocations`) is verified here as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import random
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import redis.asyncio
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.config import CacheConfig
from gateway.errors import TowerFault
from gateway.identity import Fetch, SharedEntry, entry_bounds
from gateway.redis_pool import PoolExhausted, op_timeout
from gateway.tower import REJECTION_REASONS, Identity, Rejection, parse_answer

log = logging.getLogger("tower_gateway.shared")

# Revocations touch up to a thousand keys in one pipeline; they are rare and worth a wait.
ADMIN_OP_TIMEOUT: Final = 2.0
# After a failure the request path skips Redis this long, so an outage does not cost every
# request a timeout. A successful re-subscription ends the pause at once.
RETRY_INTERVAL: Final = 1.0
LOG_INTERVAL: Final = 30.0
# The lock outlives one tower call (tower.timeout) by this much.
LOCK_MARGIN: Final = 0.5
# Waiters for a lock are woken by the holder's "filled" message; they look again after this
# long without one (a message lost with a reconnection, a holder that died).
POLL_INTERVAL: Final = 0.1
LISTEN_TIMEOUT: Final = 1.0
PING_INTERVAL: Final = 10.0
BACKOFF_START: Final = 0.1
BACKOFF_MAX: Final = 2.0
SCAN_COUNT: Final = 500
REDIS_FAULTS: Final = (RedisError, OSError, TimeoutError)

WEBHOOK_MAX_AGE: Final = 300
WEBHOOK_MAX_KEY_IDS: Final = 1000
MAX_KEY_ID_LENGTH: Final = 256
SIGNATURE_HEADER: Final = "X-Signature"
TIMESTAMP_HEADER: Final = "X-Signature-Timestamp"
_TIMESTAMP: Final = re.compile(r"[0-9]{1,12}")
_GLOB_SPECIAL: Final = re.compile(r"([*?\[\]\\])")

# Redis's clock in ms: revocation markers and the fetch times of entries compare on one clock.
_NOW_LUA: Final = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Claim a digest in one atomic round trip. KEYS: entry, lock, revoked-all. ARGV: lock token,
# lock ttl (ms), the caller's now (ms), the prefix of revocation markers. Returns {1, entry,
# time} for a fresh entry; otherwise tries the lock and returns {2, entry or nil, time} when the
# caller now holds it, {0, entry or nil, time} when another does. A stale entry comes back too:
# it may still be served if the tower fails. An entry fetched before a revocation marker of its
# key_id (or of all) reads as absent. `time` (Redis's, ms) is the fetch time of what the caller
# may store next. The caller still checks the MAC (and reads a malformed entry, to count it): a
# forged key_id here only hides the entry.
_CLAIM_LUA: Final = (
    _NOW_LUA
    + """
local entry = redis.call('GET', KEYS[1])
local now = now_ms()
if entry then
  local fetched, body = string.match(entry, '^%d+|(%d+)|[^|]*|(.*)$')
  fetched = tonumber(fetched)
  local revoked = false
  if fetched then
    local all = tonumber(redis.call('GET', KEYS[3]) or '')
    revoked = all ~= nil and all >= fetched
  end
  if fetched and not revoked then
    local ok, data = pcall(cjson.decode, body)
    if ok and type(data) == 'table' and type(data.answer) == 'table'
        and type(data.answer.key_id) == 'string' then
      local at = tonumber(redis.call('GET', ARGV[4] .. data.answer.key_id) or '')
      revoked = at ~= nil and at >= fetched
    end
  end
  if revoked then
    entry = false
  else
    local fresh = tonumber(string.match(entry, '^(%d+)|'))
    if fresh and fresh > tonumber(ARGV[3]) then return {1, entry, now} end
  end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, entry, now} end
return {0, entry, now}
"""
)

# Store an answer and release the lock. KEYS: entry, lock, revoked-all[, kid set, revoked:kid].
# ARGV: value, ttl (ms), lock token, digest hex, fetch time (Redis ms), "filled" channel. A
# revocation marker at or after the fetch time means a revocation happened while this answer
# was being fetched: it is not shared. The kid set lives as long as its longest entry. The
# lock's holder announces the digest, so the replicas waiting on the lock look at once.
_PUT_LUA: Final = """
local function after(key)
  local at = tonumber(redis.call('GET', key) or '')
  return at ~= nil and at >= tonumber(ARGV[5])
end
local stored = 0
if not after(KEYS[3]) and (#KEYS < 5 or not after(KEYS[5])) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if #KEYS == 5 then
    redis.call('SADD', KEYS[4], ARGV[4])
    if redis.call('PTTL', KEYS[4]) < tonumber(ARGV[2]) then
      redis.call('PEXPIRE', KEYS[4], ARGV[2])
    end
  end
  stored = 1
end
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
  redis.call('PUBLISH', ARGV[6], ARGV[4])
end
return stored
"""

# Mark revocations, now by Redis's clock (never moved back), for ARGV[1] ms. KEYS: the markers.
# Returns the time written.
_MARK_LUA: Final = (
    _NOW_LUA
    + """
local now = now_ms()
for _, key in ipairs(KEYS) do
  local at = tonumber(redis.call('GET', key) or '')
  if at == nil or at < now then at = now end
  redis.call('SET', key, at, 'PX', ARGV[1])
end
return now
"""
)

# Compare-and-delete: the token makes sure a replica whose lock expired (a slow tower call)
# never releases the lock another replica has taken since. ARGV: token, "filled" channel,
# digest hex: the waiters are told the lock is free (one of them takes it over).
_RELEASE_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

_FRESH: Final = 1
_LEAD: Final = 2
# Revocation markers outlive every entry fetched before them by this much more (clock skew
# between replicas, which judge an entry's stale_until by their own clocks).
MARKER_MARGIN: Final = 60.0
# Revocations a replica remembers (key_ids), oldest forgotten first beyond this.
MAX_REMEMBERED: Final = 100_000
# A revocation message older than this (by its sender's clock), or seen before, is ignored.
MESSAGE_MAX_AGE: Final = 300.0


def marker_ttl(config: CacheConfig, lock_ttl: float) -> float:
    """How long a revocation must be remembered: longer than any entry fetched before it can
    live (one tower call, then ttl and stale_if_error), plus a margin for clock skew."""
    return lock_ttl + config.ttl + config.stale_if_error + MARKER_MARGIN


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).hexdigest().encode()


class Revocations:
    """The revocations this replica heard (its own and other replicas'), by Redis's clock: an
    entry fetched at or before one is never read, whatever Redis holds (its marker deleted by
    someone who can write to Redis, an old signed entry written back)."""

    def __init__(self, keep: float, max_entries: int = MAX_REMEMBERED) -> None:
        self._keep_ms = math.ceil(keep * 1000)
        self._max = max_entries
        self._at: dict[str, int] = {}
        self._all = -1
        self._newest = 0

    def note(self, key_ids: Sequence[str] | None, at_ms: int) -> None:
        self._newest = max(self._newest, at_ms)
        if key_ids is None:
            self._all = max(self._all, at_ms)
        else:
            for key_id in key_ids:
                self._at[key_id] = max(self._at.pop(key_id, -1), at_ms)
        horizon = self._newest - self._keep_ms
        while self._at and (len(self._at) > self._max or next(iter(self._at.values())) < horizon):
            del self._at[next(iter(self._at))]

    def revoked(self, key_id: str | None, fetched_ms: int) -> bool:
        if self._all >= fetched_ms:
            return True
        return key_id is not None and self._at.get(key_id, -1) >= fetched_ms


class RedisFaults:
    """Counts Redis failures, logs them sparingly, and pauses the request path after one."""

    def __init__(
        self,
        on_error: Callable[[str], None] | None = None,
        *,
        retry_interval: float = RETRY_INTERVAL,
        log_interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_error = on_error
        self._retry_interval = retry_interval
        self._log_interval = log_interval
        self._clock = clock
        self._skip_until = -math.inf
        self._logged_at = -math.inf
        self._suppressed = 0
        self.errors = 0

    def record(self, op: str, exc: BaseException, *, pause: bool = True) -> None:
        if isinstance(exc, PoolExhausted):
            # Redis answers, the pool is too small for the load: counted, never a pause.
            op, pause = "pool", False
        self.errors += 1
        now = self._clock()
        if pause:
            self._skip_until = now + self._retry_interval
        if self._on_error is not None:
            try:
                self._on_error(op)
            except Exception:  # a broken metrics hook must not turn into a failed request
                log.exception("redis error hook failed")
        if now - self._logged_at >= self._log_interval:
            more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            log.warning(
                "redis %s failed (%s), continuing without it%s", op, type(exc).__name__, more
            )
            self._logged_at, self._suppressed = now, 0
        else:
            self._suppressed += 1

    def skipping(self) -> bool:
        """True while the request path should not even try Redis."""
        return self._clock() < self._skip_until

    def recovered(self) -> None:
        self._skip_until = -math.inf


@dataclass(slots=True)
class SharedStats:
    leads: int = 0
    polls: int = 0
    wait_timeouts: int = 0
    writes: int = 0


class SharedIdentityCache:
    """The identity cache level replicas share (`gateway.identity.SharedLevel`) on Redis.

    A lookup claims the digest with one script: a fresh entry is the answer; otherwise the
    first replica takes a short lock and calls the tower, and the others wait until its answer
    appears, the lock is freed (its call failed: the next one takes over) or the lock's time
    is up, when they call the tower themselves rather than wait on a replica that may be gone.
    The holder announces the digest on the "filled" channel when it stores its answer or frees
    the lock (`wake`); waiters also look again every `poll_interval` in case that is lost.
    Entries carry an HMAC bound to their digest, so write access to Redis alone can neither
    forge an identity nor move one to another key; they are read with the field rules of a
    tower answer, and never when fetched before a revocation of their key_id.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str,
        config: CacheConfig,
        keys: Sequence[bytes],
        lock_ttl: float,
        faults: RedisFaults,
        revocations: Revocations | None = None,
        clock: Callable[[], float] = time.time,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._config = config
        # The first key signs; all are accepted (the previous ones while a rotation rolls out).
        self._keys = tuple(keys)
        self._lock_ttl = lock_ttl
        self.marker_ttl = marker_ttl(config, lock_ttl)
        self.revocations = revocations or Revocations(self.marker_ttl)
        self._faults = faults
        self._clock = clock
        self._poll = poll_interval
        self._op_timeout = op_timeout(client)
        self.filled_channel = prefix + "filled"
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._claim = client.register_script(_CLAIM_LUA)
        self._put_script = client.register_script(_PUT_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._mark = client.register_script(_MARK_LUA)
        self.stats = SharedStats()

    # ------------------------------------------------------------------ lookups

    async def load(self, digest: bytes, fetch: Fetch) -> SharedEntry | Identity | Rejection:
        if self._faults.skipping():
            return await fetch()
        hexdigest = digest.hex()
        token = secrets.token_hex(16)
        holder: str | None = None
        stale: SharedEntry | None = None
        shared_ok = True
        fetched_ms: int | None = None
        deadline = time.monotonic() + self._lock_ttl
        woken = asyncio.Event()
        waiters = self._waiters.setdefault(hexdigest, set())
        waiters.add(woken)
        try:
            while True:
                # Cleared before the claim: a message that arrives after its answer still wakes.
                woken.clear()
                state, raw, now_ms = await self._claim_once(hexdigest, token)
                # The earliest time before the fetch: a revocation after it wins.
                fetched_ms = now_ms if fetched_ms is None else fetched_ms
                entry = self._decode(digest, raw) if raw is not None else None
                if state == _FRESH:
                    if entry is not None and not _expired(entry, self._clock()):
                        return entry
                    break  # unreadable or just expired: fetch without the lock
                if entry is not None and isinstance(entry.answer, Identity):
                    stale = entry
                if state == _LEAD:
                    holder = token
                    self.stats.leads += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stats.wait_timeouts += 1
                    break
                self.stats.polls += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(self._poll, left)):
                        await woken.wait()
        except REDIS_FAULTS as exc:
            self._faults.record("claim", exc)
            shared_ok = False
        finally:
            waiters.discard(woken)
            if not waiters:
                self._waiters.pop(hexdigest, None)
        try:
            answer = await fetch()
        except TowerFault as fault:
            if holder is not None:
                await self._unlock(hexdigest, holder)
            if stale is not None and self._clock() < stale.stale_until:
                return replace(stale, fault=fault)
            raise
        if shared_ok and fetched_ms is not None:
            await self._put(digest, answer, holder, fetched_ms)
        return answer

    def wake(self, hexdigest: str) -> None:
        """The lock on a digest was released (its answer stored, or its call failed): the
        lookups of this process waiting on it look again now."""
        for woken in self._waiters.get(hexdigest, ()):
            woken.set()

    async def _claim_once(self, hexdigest: str, token: str) -> tuple[int, bytes | None, int]:
        now_ms = math.floor(self._clock() * 1000)
        async with asyncio.timeout(self._op_timeout):
            reply = await self._claim(
                keys=[
                    self._key("id:", hexdigest),
                    self._key("lock:", hexdigest),
                    self._key("revoked-all"),
                ],
                args=[token, math.ceil(self._lock_ttl * 1000), now_ms, self._key("revoked:")],
            )
        state, raw, redis_ms = int(reply[0]), reply[1], int(reply[2])
        return state, raw if isinstance(raw, bytes) else None, redis_ms

    async def _unlock(self, hexdigest: str, token: str) -> None:
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._release(
                    keys=[self._key("lock:", hexdigest)],
                    args=[token, self.filled_channel, hexdigest],
                )
        except REDIS_FAULTS as exc:
            self._faults.record("unlock", exc)

    # ------------------------------------------------------------------ writes

    async def _put(
        self, digest: bytes, answer: Identity | Rejection, token: str | None, fetched_ms: int
    ) -> None:
        now = self._clock()
        hexdigest = digest.hex()
        keys = [
            self._key("id:", hexdigest),
            self._key("lock:", hexdigest),
            self._key("revoked-all"),
        ]
        payload: dict[str, Any]
        if isinstance(answer, Rejection):
            fresh_until = stale_until = now + self._config.negative_ttl
            payload = {"answer": {"valid": False, "reason": answer.reason}}
        else:
            fresh_until, stale_until = entry_bounds(answer, now, self._config)
            payload = {"stale_until": stale_until, "answer": _answer_json(answer)}
            keys += [self._key("kid:", answer.key_id), self._key("revoked:", answer.key_id)]
        value: bytes | None = None
        if stale_until > now:
            try:
                value = self._encode(digest, fresh_until, fetched_ms, payload)
            except (TypeError, ValueError) as exc:  # metadata JSON cannot carry: not shared
                self._faults.record("encode", exc, pause=False)
        try:
            async with asyncio.timeout(self._op_timeout):
                if value is not None:
                    ttl_ms = max(1, math.ceil((stale_until - now) * 1000))
                    args: list[bytes | str | int] = [
                        value,
                        ttl_ms,
                        token or "",
                        hexdigest,
                        fetched_ms,
                        self.filled_channel,
                    ]
                    stored = await self._put_script(keys=keys, args=args)
                    self.stats.writes += int(stored)
                elif token is not None:
                    await self._release(
                        keys=[keys[1]], args=[token, self.filled_channel, hexdigest]
                    )
        except REDIS_FAULTS as exc:
            self._faults.record("put", exc)

    # ------------------------------------------------------------------ revocation

    async def forget(self, key_ids: Sequence[str] | None) -> int:
        """Mark some key_ids (None: all) revoked and delete their shared entries; returns the
        revocation's time (Redis's clock, ms). Raises on a Redis fault.

        The markers go first and outlive every entry fetched before them: an answer being
        fetched right now is not shared, and an old entry written back is never read.
        """
        ttl_ms = math.ceil(self.marker_ttl * 1000)
        client = self._client
        if key_ids is None:
            async with asyncio.timeout(ADMIN_OP_TIMEOUT):
                at = int(await self._mark(keys=[self._key("revoked-all")], args=[ttl_ms]))
            self.revocations.note(None, at)
            for kind in ("id:", "kid:"):
                pattern = _GLOB_SPECIAL.sub(r"\\\1", self._prefix + kind) + "*"
                cursor = 0
                while True:
                    async with asyncio.timeout(ADMIN_OP_TIMEOUT):
                        cursor, names = await client.scan(cursor, match=pattern, count=SCAN_COUNT)
                        if names:
                            await client.unlink(*names)
                    if cursor == 0:
                        break
            return at
        async with asyncio.timeout(ADMIN_OP_TIMEOUT):
            markers = [self._key("revoked:", key_id) for key_id in key_ids]
            at = int(await self._mark(keys=markers, args=[ttl_ms]))
            self.revocations.note(key_ids, at)
            pipe = client.pipeline(transaction=False)
            for key_id in key_ids:
                pipe.smembers(self._key("kid:", key_id))
            replies = await pipe.execute()
        names = [self._key("kid:", key_id) for key_id in key_ids]
        for members in replies:
            names += [self._key("id:", m.decode("ascii", "replace")) for m in members]
        async with asyncio.timeout(ADMIN_OP_TIMEOUT):
            await client.unlink(*names)
        return at

    # ------------------------------------------------------------------ encoding

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self._prefix}{kind}{name}"

    def _encode(
        self, digest: bytes, fresh_until: float, fetched_ms: int, payload: dict[str, Any]
    ) -> bytes:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        fresh = str(math.floor(fresh_until * 1000)).encode()
        fetched = str(fetched_ms).encode()
        # Bound to the digest: an entry copied under another key's digest fails the check.
        mac = _mac(self._keys[0], digest, fresh, fetched, body)
        return b"|".join((fresh, fetched, mac, body))

    def _decode(self, digest: bytes, raw: bytes) -> SharedEntry | None:
        try:
            fresh, fetched, mac, body = raw.split(b"|", 3)
            if not any(
                hmac.compare_digest(mac, _mac(key, digest, fresh, fetched, body))
                for key in self._keys
            ):
                raise ValueError("entry MAC does not match")
            entry = _entry_from_json(json.loads(body), int(fresh) / 1000, self._clock())
        except (ValueError, TypeError, KeyError, RecursionError, TowerFault) as exc:
            self._faults.record("decode", exc, pause=False)
            return None
        key_id = entry.answer.key_id if isinstance(entry.answer, Identity) else None
        if self.revocations.revoked(key_id, int(fetched)):
            return None  # fetched before a revocation heard here: whatever Redis says
        return entry


def _expired(entry: SharedEntry, now: float) -> bool:
    return isinstance(entry.answer, Identity) and entry.answer.expired(now)


def _answer_json(identity: Identity) -> dict[str, Any]:
    """An identity as the tower's answer would carry it: read back with `parse_answer`."""
    metadata = dict(identity.metadata)
    if identity.team is not None:
        metadata["team"] = identity.team
    if identity.rate_limit is not None:
        metadata["rate_limit"] = identity.rate_limit
    return {
        "valid": True,
        "key_id": identity.key_id,
        "user_id": identity.user_id,
        "role": identity.role,
        "scopes": list(identity.scopes),
        "expires_at": identity.expires_at,
        "metadata": metadata,
    }


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError("expected a finite number")
    return float(value)


def _entry_from_json(data: object, fresh_until: float, now: float) -> SharedEntry:
    """The strict reading of a stored entry: the answer by the same rules as a tower's
    (`parse_answer`); anything unexpected raises (and is a miss)."""
    if not isinstance(data, dict):
        raise TypeError("entry is not an object")
    raw = data["answer"]
    if not isinstance(raw, dict):
        raise TypeError("answer is not an object")
    if raw.get("valid") is False:
        if raw.get("reason") not in REJECTION_REASONS:
            raise ValueError("unknown refusal reason")
        return SharedEntry(Rejection(raw["reason"]), fresh_until, fresh_until)
    answer = parse_answer(200, raw, now=now)
    if isinstance(answer, Rejection):  # expired since it was stored
        return SharedEntry(answer, fresh_until, fresh_until)
    return SharedEntry(answer, fresh_until, _number(data["stale_until"]))


# --------------------------------------------------------------------------- revocation bus


Forget = Callable[[Sequence[str] | None], object]


class RevocationBus:
    """Publishes revocations and applies every replica's (its own too), from a background task.

    Messages are signed with the shared secret (every configured one, so replicas still on the
    previous secret accept them during a rotation), carry their sender's time and a random id:
    an unsigned, badly signed, old or replayed message is ignored and counted
    (`tower_gateway_redis_errors_total{op="revocation_signature"}`), so whoever can publish on
    Redis cannot empty every replica's cache.

    Pub/sub keeps nothing for a subscriber that is away, so a replica that (re)subscribes may
    have missed revocations: it drops its whole local cache (`resync`) rather than serve an
    identity revoked meanwhile. redis-py may reconnect and re-subscribe on its own, so every
    subscribe confirmation counts, not only the ones after an error seen here.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        channel: str,
        origin: str,
        apply: Forget,
        resync: Callable[[], object],
        faults: RedisFaults,
        keys: Sequence[bytes],
        revocations: Revocations,
        clock: Callable[[], float] = time.time,
        filled_channel: str | None = None,
        on_filled: Callable[[str], None] | None = None,
    ) -> None:
        self._client = client
        self._channel = channel
        self._filled_channel = filled_channel
        self._on_filled = on_filled
        self._origin = origin
        self._apply = apply
        self._resync = resync
        self._faults = faults
        self._keys = tuple(keys)
        self._revocations = revocations
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._confirmed = False
        self._missed = False
        self._delay = BACKOFF_START
        self.connected = False
        self.resyncs = 0
        self.received = 0
        self.rejected = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tower-gateway-revocations")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def publish(self, key_ids: Sequence[str] | None, at_ms: int) -> None:
        """Tell every replica (this one too); raises on a Redis fault."""
        message: dict[str, Any] = {
            "origin": self._origin,
            "id": secrets.token_hex(16),
            "ts": self._clock(),
            "at": at_ms,
        }
        if key_ids is None:
            message["all"] = True
        else:
            message["key_ids"] = list(key_ids)
        async with asyncio.timeout(ADMIN_OP_TIMEOUT):
            await self._client.publish(self._channel, self.sign(json.dumps(message).encode()))

    def sign(self, body: bytes) -> bytes:
        channel = self._channel.encode()
        macs = b",".join(_mac(key, b"revocation", channel, body) for key in self._keys)
        return macs + b"|" + body

    def _verified(self, data: object) -> bytes | None:
        """The body of a message signed with one of the shared secrets, else None."""
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, bytes) or b"|" not in data:
            return None
        macs, body = data.split(b"|", 1)
        channel = self._channel.encode()
        expected = [_mac(key, b"revocation", channel, body) for key in self._keys]
        for mac in macs.split(b",")[: 2 * len(self._keys) + 2]:
            if any(hmac.compare_digest(mac, e) for e in expected):
                return body
        return None

    def _fresh(self, message: dict[str, Any]) -> bool:
        """Not too old by its sender's clock, and not seen before (a replay)."""
        ts, message_id = message.get("ts"), message.get("id")
        now = self._clock()
        if (
            isinstance(ts, bool)
            or not isinstance(ts, int | float)
            or not isinstance(message_id, str)
            or abs(now - ts) > MESSAGE_MAX_AGE
            or message_id in self._seen
        ):
            return False
        while self._seen and next(iter(self._seen.values())) < now - 2 * MESSAGE_MAX_AGE:
            del self._seen[next(iter(self._seen))]
        self._seen[message_id] = now
        return True

    async def _run(self) -> None:
        while True:
            try:
                await self._listen()
            except REDIS_FAULTS as exc:
                self._faults.record("subscribe", exc)
            except Exception:  # the listener must outlive any bug in one message
                log.exception("revocation listener failed")
            self.connected = False
            self._missed = True
            await asyncio.sleep(self._delay * random.uniform(0.5, 1.0))
            self._delay = min(self._delay * 2, BACKOFF_MAX)

    async def _listen(self) -> None:
        pubsub = self._client.pubsub()
        try:
            channels = [self._channel]
            if self._filled_channel is not None:
                channels.append(self._filled_channel)
            await pubsub.subscribe(*channels)
            heard = pinged = time.monotonic()
            while True:
                message = await pubsub.get_message(timeout=LISTEN_TIMEOUT)
                now = time.monotonic()
                if message is None:
                    # A half-open connection reads nothing forever: ask, and give up on it
                    # when even a PING goes unanswered.
                    if now - heard > 3 * PING_INTERVAL:
                        raise RedisConnectionError("revocation channel went silent")
                    if now - heard > PING_INTERVAL and now - pinged > PING_INTERVAL:
                        pinged = now
                        await pubsub.ping()
                    continue
                heard = now
                kind = message.get("type")
                channel = message.get("channel")
                if isinstance(channel, bytes):
                    channel = channel.decode("utf-8", "replace")
                if channel != self._channel:
                    if kind == "message":
                        self._filled(message.get("data"))
                elif kind == "subscribe":
                    self._subscribed()
                elif kind == "message":
                    self._received(message.get("data"))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _filled(self, data: object) -> None:
        """A digest's lock was released: wake this process's waiters (a hint only, unsigned:
        a forged one costs a lookup)."""
        if self._on_filled is None:
            return
        if isinstance(data, bytes):
            data = data.decode("ascii", "replace")
        if isinstance(data, str) and len(data) <= 128:
            self._on_filled(data)

    def _subscribed(self) -> None:
        self._delay = BACKOFF_START
        self._faults.recovered()
        if self._confirmed or self._missed:
            self.resyncs += 1
            log.warning(
                "revocation channel subscribed again: dropping the local cache, "
                "revocations may have been missed"
            )
        # Also on the first subscription: what was cached before it (requests served while
        # starting, or while Redis was down) may have been revoked unheard.
        self._resync()
        self._confirmed, self._missed, self.connected = True, False, True

    def _received(self, data: object) -> None:
        self.received += 1
        body = self._verified(data)
        if body is None:
            # Not from a replica: whoever can publish on Redis must not empty every cache.
            self.rejected += 1
            self._faults.record("revocation_signature", ValueError("unsigned"), pause=False)
            return
        try:
            message = json.loads(body)
            if not isinstance(message, dict):
                raise TypeError("not an object")
            if not self._fresh(message):
                self.rejected += 1
                self._faults.record("revocation_replay", ValueError("replayed"), pause=False)
                return
            key_ids: list[str] | None = None
            if message.get("all") is not True:
                key_ids = message.get("key_ids")
                if not isinstance(key_ids, list) or not all(isinstance(k, str) for k in key_ids):
                    raise TypeError("key_ids is not a list of strings")
            at = message.get("at")
            if isinstance(at, int) and not isinstance(at, bool):
                self._revocations.note(key_ids, at)
        except (TypeError, ValueError, RecursionError) as exc:
            # A signed but unreadable revocation still revokes something: drop the whole
            # cache, as after missed messages.
            self._faults.record("decode", exc, pause=False)
            self._resync()
            return
        try:
            # The origin's own message too: a request that re-read an entry between its local
            # drop and the shared deletes is dropped again.
            self._apply(key_ids)
        except Exception:
            log.exception("applying a revocation failed")


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


# --------------------------------------------------------------------------- the webhook


def parse_key_ids(message: dict[str, Any]) -> list[str]:
    """`{"key_ids": [...]}`: at most WEBHOOK_MAX_KEY_IDS printable strings of at most
    MAX_KEY_ID_LENGTH characters, duplicates dropped. Raises ValueError otherwise."""
    key_ids = message.get("key_ids")
    if not isinstance(key_ids, list) or len(key_ids) > WEBHOOK_MAX_KEY_IDS:
        raise ValueError(f"key_ids must be a list of at most {WEBHOOK_MAX_KEY_IDS} strings")
    for key_id in key_ids:
        if (
            not isinstance(key_id, str)
            or not 0 < len(key_id) <= MAX_KEY_ID_LENGTH
            or not key_id.isprintable()
        ):
            raise ValueError(f"each key_id must be 1-{MAX_KEY_ID_LENGTH} printable characters")
    return list(dict.fromkeys(key_ids))


def sign_webhook(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Signature` value for a body sent at `timestamp` (epoch seconds)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_webhook(
    secret: str, timestamp: str | None, signature: str | None, body: bytes, now: float
) -> bool:
    if timestamp is None or signature is None or not _TIMESTAMP.fullmatch(timestamp):
        return False
    # The timestamp is signed, so an old request cannot be made young: replays are bounded
    # to this window (and a revocation repeated is harmless).
    if abs(now - int(timestamp)) > WEBHOOK_MAX_AGE:
        return False
    expected = sign_webhook(secret, timestamp, body).encode()
    # compare_digest: the time taken must not reveal how much of the signature matched.
    return hmac.compare_digest(expected, signature.strip().encode("utf-8", "replace"))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def revocation_webhook(
    secret: str | None,
    revoke: Callable[[Sequence[str]], Awaitable[int]],
    *,
    clock: Callable[[], float] = time.time,
) -> Handler:
    """`POST /admin/revocations` from the tower: a signed `{"key_ids": [...]}`, each revoked
    here and on every replica. The admin bearer is checked by the caller; 404 without a
    configured secret, 401 on a bad or stale signature, 400 on a malformed body."""

    def error(status: int, code: str, detail: str) -> web.Response:
        return web.json_response({"error": code, "detail": detail}, status=status)

    async def handler(request: web.Request) -> web.StreamResponse:
        if secret is None:
            return error(404, "not_found", "revocation webhook disabled: no webhook secret")
        body = await request.read()
        headers = request.headers
        if not verify_webhook(
            secret, headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER), body, clock()
        ):
            return error(401, "bad_signature", "missing, wrong or expired webhook signature")
        try:
            message = json.loads(body)
        except (ValueError, RecursionError):
            return error(400, "bad_request", "the body is not JSON")
        try:
            if not isinstance(message, dict):
                raise ValueError("the body must be a JSON object")
            key_ids = parse_key_ids(message)
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        dropped = await revoke(key_ids)
        return web.json_response({"revoked": len(key_ids), "dropped_entries": dropped})

    return handler
