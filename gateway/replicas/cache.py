"""The identity cache level replicas share on Redis: entries signed by the fleet's secret,
one tower call per cold key across replicas (a Redis lock), revocation markers honoured."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import redis.asyncio

from gateway.auth.identity import Fetch, SharedEntry, entry_bounds
from gateway.config import CacheConfig
from gateway.errors import TowerFault
from gateway.replicas.connection import (
    _GLOB_SPECIAL,
    ADMIN_OP_TIMEOUT,
    POLL_INTERVAL,
    REDIS_FAULTS,
    SCAN_COUNT,
    RedisFaults,
    Revocations,
    _mac,
    marker_ttl,
    op_timeout,
)
from gateway.tower import REJECTION_REASONS, Identity, Rejection, parse_answer

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
  redis.call('DEL', KEYS[2]); redis.call('PUBLISH', ARGV[6], ARGV[4])
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
  redis.call('DEL', KEYS[1]); redis.call('PUBLISH', ARGV[2], ARGV[3]); return 1
end
return 0
"""


_FRESH: Final = 1


_LEAD: Final = 2


@dataclass(slots=True)
class SharedStats:
    leads: int = 0
    polls: int = 0
    wait_timeouts: int = 0
    writes: int = 0


class SharedIdentityCache:
    """The identity cache level replicas share (`gateway.auth.identity.SharedLevel`) on Redis.

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
        """A digest's lock was released: the lookups here waiting on it look again now."""
        for woken in self._waiters.get(hexdigest, ()):
            woken.set()

    async def _release_lock(self, hexdigest: str, token: str) -> None:
        keys, args = [self._key("lock:", hexdigest)], [token, self.filled_channel, hexdigest]
        await self._release(keys=keys, args=args)

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
                await self._release_lock(hexdigest, token)
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
                    args: list[bytes | str | int] = [value, ttl_ms, token or "", hexdigest]
                    args += [fetched_ms, self.filled_channel]
                    stored = await self._put_script(keys=keys, args=args)
                    self.stats.writes += int(stored)
                elif token is not None:
                    await self._release_lock(hexdigest, token)
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
