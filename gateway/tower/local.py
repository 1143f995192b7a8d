"""The embedded tower: API keys in a SQLite file, stored only as keyed hashes.

`KeyStore` (`gateway.tower.store`) owns the database (create, list, revoke,
rotate, lookup, batched usage counts) and is safe for several processes at
once; `LocalTower` puts it behind the `Tower` protocol, answering through
`parse_answer` exactly as a remote tower would. The hash secret is configured
or kept next to the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Final

from gateway.config import LocalTowerConfig
from gateway.errors import ConfigError, TowerFault
from gateway.tower import TowerAnswer, parse_answer
from gateway.tower.records import MIN_SECRET_BYTES, StoreError
from gateway.tower.store import KeyStore

log = logging.getLogger(__name__)

SECRET_BYTES: Final = 32


def resolve_hash_secret(cfg: LocalTowerConfig) -> bytes:
    """The configured hash secret, else one generated once and kept in `<db>.secret`.

    Losing that file invalidates every stored key: back it up with the database.
    """
    if cfg.hash_secret is not None:
        secret = cfg.hash_secret.encode()
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(
                "tower.local.hash_secret", f"must be at least {MIN_SECRET_BYTES} bytes"
            )
        return secret
    path = Path(f"{cfg.db}.secret")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _read_or_create_secret(path)
    except OSError as exc:
        raise ConfigError("tower.local.db", f"cannot keep a secret in {path}: {exc}") from None


def _read_or_create_secret(path: Path) -> bytes:
    try:
        # O_EXCL: of several processes starting together exactly one writes the secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        secret = secrets.token_bytes(SECRET_BYTES)
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        return secret
    # The creator may still be writing: give it a moment before calling the file bad.
    deadline = time.monotonic() + 2.0
    while True:
        text = path.read_text(encoding="ascii", errors="replace").strip()
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            secret = b""
        if len(secret) >= MIN_SECRET_BYTES:
            return secret
        if time.monotonic() > deadline:
            raise ConfigError("tower.local.db", f"{path} does not hold a hex secret")
        time.sleep(0.02)


async def flush_periodically(store: KeyStore, interval: float) -> None:
    """Write batched usage counts every `interval` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(store.flush_usage)
        except sqlite3.Error as exc:
            log.warning("key usage flush failed, counts kept for the next one: %s", exc)


class LocalTower:
    """The `Tower` protocol over a local `KeyStore`.

    Lookups are one indexed SELECT run inline (no thread per call). Usage
    counts are written every `usage_flush_interval` seconds by a task that
    `start()` launches (the first `validate` launches it too); `close()`
    stops it and writes what is left.
    """

    name: str = "local"

    def __init__(self, cfg: LocalTowerConfig, *, store: KeyStore | None = None) -> None:
        if store is None:
            try:
                store = KeyStore(cfg.db, prefix=cfg.prefix, hash_secret=resolve_hash_secret(cfg))
            except StoreError as exc:
                raise ConfigError("tower.local.db", str(exc)) from None
        self.store = store
        self._interval = cfg.usage_flush_interval
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.create_task(
                flush_periodically(self.store, self._interval), name="local-tower-usage-flush"
            )

    async def validate(self, api_key: str) -> TowerAnswer:
        await self.start()
        try:
            body = self.store.lookup(api_key)
        except (sqlite3.Error, ValueError) as exc:
            # ValueError: a row whose JSON columns do not decode. Either way, no answer.
            raise TowerFault("error", f"local key store: {type(exc).__name__}: {exc}") from None
        return parse_answer(200, body)

    async def ping(self) -> bool:
        return self.store.ping()

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        try:
            await asyncio.to_thread(self.store.flush_usage)
        except sqlite3.Error as exc:
            log.warning(
                "final key usage flush failed, %d uses not recorded: %s",
                self.store.pending_usage,
                exc,
            )
        self.store.close()
