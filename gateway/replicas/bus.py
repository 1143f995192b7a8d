"""The revocation bus: a revocation made on one replica reaches every other through Redis
pub/sub, signed, and is applied there at once."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import random
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.replicas.connection import (
    ADMIN_OP_TIMEOUT,
    BACKOFF_MAX,
    BACKOFF_START,
    LISTEN_TIMEOUT,
    MESSAGE_MAX_AGE,
    PING_INTERVAL,
    REDIS_FAULTS,
    RedisFaults,
    Revocations,
    _mac,
    log,
)

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
