"""The embedded tower: API keys in a SQLite file, stored only as keyed hashes.

`KeyStore` owns the database (create, list, revoke, rotate, lookup, batched
usage counts) and is safe for several processes at once; `LocalTower` puts it
behind the `Tower` protocol, answering through `parse_answer` exactly as a
remote tower would.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from gateway.config import LocalTowerConfig
from gateway.errors import ConfigError, TowerFault
from gateway.tower import MAX_FIELD_LENGTH, MAX_SCOPES, TowerAnswer, keyformat, parse_answer

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
# How long a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT_SECONDS: Final = 5.0
SECRET_BYTES: Final = 32
MIN_SECRET_BYTES: Final = 16
MAX_DAYS: Final = 36_500.0
MAX_METADATA_BYTES: Final = 8192
DAY: Final = 86_400.0
HOUR: Final = 3_600.0

# The columns of a `KeyRecord`, in field order (everything but the hash).
_SELECT_RECORDS: Final = (
    "SELECT key_id, display_prefix, user_id, role, scopes, env, created_at, expires_at,"
    " metadata, status, revoked_at, revoke_reason, grace_until, rotated_to, last_used_at,"
    " use_count FROM api_keys"
)
_BY_ID: Final = " WHERE key_id = ?"
_SCHEMA: Final = """
CREATE TABLE api_keys (
    key_id         TEXT PRIMARY KEY,
    key_hash       BLOB NOT NULL UNIQUE,  -- HMAC-SHA256(hash secret, key); the index lookups use
    display_prefix TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    role           TEXT NOT NULL,
    scopes         TEXT NOT NULL,         -- JSON list
    env            TEXT NOT NULL CHECK (env IN ('test', 'live')),
    created_at     REAL NOT NULL,
    expires_at     REAL,
    metadata       TEXT NOT NULL,         -- JSON object: team, rate_limit, free-form
    status         TEXT NOT NULL CHECK (status IN ('active', 'revoked', 'rotated')),
    revoked_at     REAL,
    revoke_reason  TEXT,
    grace_until    REAL,
    rotated_to     TEXT,
    last_used_at   REAL,
    use_count      INTEGER NOT NULL DEFAULT 0
)
"""


class StoreError(ValueError):
    """A key store request that cannot be carried out; the message is fit for an operator."""


class KeyNotFound(StoreError):
    """No key has the given key_id."""


class FieldError(StoreError):
    """A value the store refuses; `field` names it as the API and the CLI spell it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class KeyStateError(StoreError):
    """The key's state forbids the change (rotating a revoked key, editing a rotated one)."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """Everything stored about a key except its hash; safe to show."""

    key_id: str
    display_prefix: str
    user_id: str
    role: str
    scopes: tuple[str, ...]
    env: str
    created_at: float
    expires_at: float | None
    metadata: Mapping[str, Any]
    status: str
    revoked_at: float | None
    revoke_reason: str | None
    grace_until: float | None
    rotated_to: str | None
    last_used_at: float | None
    use_count: int

    def state(self, now: float | None = None) -> str:
        """The effective state: active, rotated (old key in its grace), expired or revoked."""
        now = time.time() if now is None else now
        if self.status == "revoked":
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return self.status

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(scopes=list(self.scopes), metadata=dict(self.metadata), state=self.state())
        return data


def _text(value: object, what: str, field: str | None = None) -> str:
    # The same limits `parse_answer` applies, so every stored key can be served.
    if not isinstance(value, str) or not value.strip():
        raise FieldError(field or what, f"{what} must be a non-empty string")
    if len(value) > MAX_FIELD_LENGTH or not value.isprintable():
        raise FieldError(
            field or what, f"{what} must be printable text of at most {MAX_FIELD_LENGTH} characters"
        )
    return value


def _number(value: object, what: str, *, low: float, high: float, low_ok: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FieldError(what, f"{what} must be a number")
    if value < low or (value == low and not low_ok) or value > high:
        bound = f">= {low:g}" if low_ok else f"> {low:g}"
        raise FieldError(what, f"{what} must be {bound} and at most {high:g}, got {value:g}")
    return float(value)


def _scopes(scopes: Iterable[str]) -> builtins.list[str]:
    if isinstance(scopes, str):
        raise FieldError("scopes", "scopes must be a list of strings, not one string")
    if not isinstance(scopes, Iterable):
        raise FieldError("scopes", "scopes must be a list of strings")
    cleaned = sorted({_text(s, "scope", "scopes") for s in scopes})
    if len(cleaned) > MAX_SCOPES:
        raise FieldError("scopes", f"at most {MAX_SCOPES} scopes")
    return cleaned


def _metadata(
    metadata: Mapping[str, Any] | None, *, team: str | None, rate_limit: float | None
) -> str:
    meta = dict(metadata or {})
    if team is not None:
        meta["team"] = team
    if rate_limit is not None:
        meta["rate_limit"] = rate_limit
    if meta.get("team") is not None:
        _text(meta["team"], "team")
    if meta.get("rate_limit") is not None:
        _number(meta["rate_limit"], "rate_limit", low=0, high=1e9, low_ok=False)
    try:
        encoded = json.dumps(meta, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise FieldError("metadata", f"metadata must be plain JSON: {exc}") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise FieldError("metadata", f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")
    return encoded


def _record(row: tuple[Any, ...]) -> KeyRecord:
    values = list(row)
    values[4] = tuple(json.loads(values[4]))
    values[8] = MappingProxyType(json.loads(values[8]))
    return KeyRecord(*values)


def _invalid(reason: str) -> dict[str, Any]:
    return {"valid": False, "reason": reason}


class KeyStore:
    """API keys in one SQLite file (WAL), shared safely by every process that opens it.

    Reads go through one long-lived connection; every write opens its own
    connection for one short `BEGIN IMMEDIATE` transaction, so a writer never
    holds up lookups and concurrent writers queue on SQLite's lock.
    """

    def __init__(self, db_path: str | os.PathLike[str], *, prefix: str = "tk", hash_secret: bytes):
        if not keyformat.valid_prefix(prefix):
            raise StoreError(f"key prefix must be 1-16 of a-z0-9: {prefix!r}")
        if len(hash_secret) < MIN_SECRET_BYTES:
            raise StoreError(f"hash secret must be at least {MIN_SECRET_BYTES} bytes")
        self.path = str(db_path)
        self.prefix = prefix
        self._secret = hash_secret
        # Statements run by lookups; lets tests prove malformed keys never reach the database.
        self.queries = 0
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._usage: dict[str, tuple[int, float]] = {}
        self._usage_lock = threading.Lock()
        try:
            self._init_schema()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open key store {self.path}: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit; timeout is SQLite's busy_timeout.
        return sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )

    def _init_schema(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Created owner-only before SQLite opens it; the -wal/-shm files inherit the mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = self._connect()
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self._switch_to_wal(conn)
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(_SCHEMA)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema {version}, newer than this program")
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _switch_to_wal(self, conn: sqlite3.Connection) -> None:
        deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                # The switch needs an exclusive lock and SQLite does not call the
                # busy handler for it, so processes opening a new file together retry.
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if mode != "wal":
            raise StoreError(f"cannot use WAL journaling on {self.path} (got {mode})")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> builtins.list[tuple[Any, ...]]:
        with self._reader_lock:
            if self._reader is None:
                self._reader = self._connect()
            return self._reader.execute(sql, params).fetchall()

    def _hash(self, raw_key: str) -> bytes:
        return hmac.new(self._secret, raw_key.encode(), hashlib.sha256).digest()

    def _insert(
        self, conn: sqlite3.Connection, env: str, now: float, values: tuple[Any, ...]
    ) -> tuple[str, str]:
        raw = keyformat.generate(self.prefix, env)
        key_id = f"key_{secrets.token_hex(8)}"
        conn.execute(
            "INSERT INTO api_keys (key_id, key_hash, display_prefix, env, created_at, status,"
            " user_id, role, scopes, expires_at, metadata)"
            " VALUES (?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?)",
            (key_id, self._hash(raw), keyformat.display_prefix(raw), env, now, *values),
        )
        return raw, key_id

    def create(
        self,
        user_id: str,
        role: str,
        scopes: Iterable[str] = (),
        expires_in_days: float | None = None,
        env: str = "test",
        rate_limit: float | None = None,
        team: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key; the raw key is returned here only and never stored."""
        now = time.time()
        values = (
            _text(user_id, "user_id"),
            _text(role, "role"),
            json.dumps(_scopes(scopes)),
            None
            if expires_in_days is None
            else now
            + DAY * _number(expires_in_days, "expires_in_days", low=0, high=MAX_DAYS, low_ok=False),
            _metadata(metadata, team=team, rate_limit=rate_limit),
        )
        if env not in keyformat.ENVS:
            raise FieldError("env", f"env must be one of {', '.join(keyformat.ENVS)}, got {env!r}")
        with self._write() as conn:
            raw, key_id = self._insert(conn, env, now, values)
        return raw, self.get(key_id)

    def get(self, key_id: str) -> KeyRecord:
        rows = self._read(_SELECT_RECORDS + _BY_ID, (key_id,))
        if not rows:
            raise KeyNotFound(f"no key with id {key_id!r}")
        return _record(rows[0])

    def revoke(self, key_id: str, reason: str = "revoked") -> KeyRecord:
        """Refuse the key from now on; revoking twice keeps the first revocation."""
        reason = _text(reason, "reason")
        with self._write() as conn:
            row = conn.execute("SELECT status FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                raise KeyNotFound(f"no key with id {key_id!r}")
            if row[0] != "revoked":
                conn.execute(
                    "UPDATE api_keys SET status = 'revoked', revoked_at = ?, revoke_reason = ?"
                    " WHERE key_id = ?",
                    (time.time(), reason, key_id),
                )
        return self.get(key_id)

    def rotate(self, key_id: str, grace_hours: float = 24.0) -> tuple[str, KeyRecord]:
        """A new key with the same grants; the old one stays valid `grace_hours` more."""
        grace = HOUR * _number(grace_hours, "grace_hours", low=0, high=MAX_DAYS * 24, low_ok=True)
        now = time.time()
        with self._write() as conn:
            row = conn.execute(_SELECT_RECORDS + _BY_ID, (key_id,)).fetchone()
            if row is None:
                raise KeyNotFound(f"no key with id {key_id!r}")
            old = _record(row)
            state = old.state(now)
            if old.status == "rotated":
                raise KeyStateError(f"key {key_id} was already rotated to {old.rotated_to}")
            if state != "active":
                raise KeyStateError(f"key {key_id} is {state}; create a new key instead")
            values = (old.user_id, old.role, row[4], old.expires_at, row[8])
            raw, new_id = self._insert(conn, old.env, now, values)
            # The old key's answers carry the grace end as expires_at, so no
            # gateway cache can keep it alive past the grace.
            grace_until = now + grace
            old_expiry = grace_until if old.expires_at is None else min(old.expires_at, grace_until)
            conn.execute(
                "UPDATE api_keys SET status = 'rotated', grace_until = ?, expires_at = ?,"
                " rotated_to = ? WHERE key_id = ?",
                (grace_until, old_expiry, new_id, key_id),
            )
        return raw, self.get(new_id)

    def lookup(self, raw_key: str, now: float | None = None) -> dict[str, Any]:
        """The tower answer for a key (CONTRACT section 3); counts a use of a valid key."""
        if not keyformat.looks_valid(raw_key, self.prefix):
            return _invalid("invalid_key")
        self.queries += 1
        rows = self._read(
            "SELECT key_id, user_id, role, scopes, expires_at, metadata, status, grace_until"
            " FROM api_keys WHERE key_hash = ?",
            (self._hash(raw_key),),
        )
        if not rows:
            return _invalid("invalid_key")
        key_id, user_id, role, scopes, expires_at, metadata, status, grace_until = rows[0]
        now = time.time() if now is None else now
        if status == "revoked":
            return _invalid("revoked_key")
        if status not in ("active", "rotated"):
            return _invalid("invalid_key")
        if (expires_at is not None and expires_at <= now) or (
            grace_until is not None and grace_until <= now
        ):
            return _invalid("expired_key")
        with self._usage_lock:
            count, last = self._usage.get(key_id, (0, now))
            self._usage[key_id] = (count + 1, max(last, now))
        return {
            "valid": True,
            "key_id": key_id,
            "user_id": user_id,
            "role": role,
            "scopes": json.loads(scopes),
            "expires_at": expires_at,
            "metadata": json.loads(metadata),
        }

    @property
    def pending_usage(self) -> int:
        """Uses counted in memory and not yet written."""
        with self._usage_lock:
            return sum(count for count, _ in self._usage.values())

    def flush_usage(self) -> int:
        """Write the counted uses in one transaction; returns how many keys were updated."""
        with self._usage_lock:
            pending, self._usage = self._usage, {}
        if not pending:
            return 0
        try:
            with self._write() as conn:
                conn.executemany(
                    "UPDATE api_keys SET use_count = use_count + ?,"
                    " last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE key_id = ?",
                    [(count, last, key_id) for key_id, (count, last) in pending.items()],
                )
        except BaseException:
            # Keep the counts for the next flush rather than lose them.
            with self._usage_lock:
                for key_id, (count, last) in pending.items():
                    now_count, now_last = self._usage.get(key_id, (0, last))
                    self._usage[key_id] = (count + now_count, max(last, now_last))
            raise
        return len(pending)

    def ping(self) -> bool:
        try:
            self._read("SELECT 1 FROM api_keys LIMIT 1")
        except sqlite3.Error:
            return False
        return True

    def close(self) -> None:
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def update(self, key_id: str, changes: Mapping[str, Any]) -> KeyRecord:
        """Change a key's grants, expiry or limits in place (the key itself stays the same).

        `changes` maps `role`, `scopes`, `expires_at`, `rate_limit` or `team` to its new
        value; None clears `expires_at` (never expires), `rate_limit` (the gateway's
        default) and `team`. An expired key may be
        extended; a revoked or rotated one cannot change.
        """
        now = time.time()
        columns: dict[str, Any] = {}
        meta_changes: dict[str, Any] = {}
        for name, value in changes.items():
            if name == "role":
                columns["role"] = _text(value, "role")
            elif name == "scopes":
                columns["scopes"] = json.dumps(_scopes(value))
            elif name == "expires_at":
                columns["expires_at"] = _expiry(value, now)
            elif name in ("team", "rate_limit"):
                meta_changes[name] = value
            else:
                raise FieldError(name, f"{name} cannot be changed")
        with self._write() as conn:
            row = conn.execute(_SELECT_RECORDS + _BY_ID, (key_id,)).fetchone()
            if row is None:
                raise KeyNotFound(f"no key with id {key_id!r}")
            old = _record(row)
            if old.status != "active":
                raise KeyStateError(f"key {key_id} is {old.state(now)} and cannot be changed")
            if meta_changes:
                meta = {**old.metadata, **meta_changes}
                columns["metadata"] = _metadata(
                    {k: v for k, v in meta.items() if v is not None}, team=None, rate_limit=None
                )
            if columns:
                # Column names come from the fixed branches above, never from the caller.
                assignments = ", ".join(f"{name} = ?" for name in columns)
                conn.execute(
                    f"UPDATE api_keys SET {assignments} WHERE key_id = ?",  # noqa: S608
                    (*columns.values(), key_id),
                )
        return self.get(key_id)

    def count(self, query: KeyQuery | None = None) -> int:
        where, params = _where(query or KeyQuery())
        # `where` is built by `_where` from fixed clauses; every value is a parameter.
        rows = self._read("SELECT COUNT(*) FROM api_keys" + where, params)  # noqa: S608
        return int(rows[0][0])

    # Defined last: inside the class body, `list` names this method from here on.
    def list(self, query: KeyQuery | None = None) -> builtins.list[KeyRecord]:
        """Keys in creation order; `query` filters and pages them."""
        query = query or KeyQuery()
        where, params = _where(query)
        sql = _SELECT_RECORDS + where + " ORDER BY created_at, key_id"
        if query.limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params += (query.limit, query.offset)
        return [_record(row) for row in self._read(sql, params)]


def _expiry(value: object, now: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FieldError("expires_at", "expires_at must be epoch seconds or null")
    if not now < value <= now + DAY * MAX_DAYS:
        raise FieldError("expires_at", "expires_at must be in the future, within 100 years")
    return float(value)


@dataclass(frozen=True, slots=True)
class KeyQuery:
    """Which keys `KeyStore.list` returns: exact user and role, one state, a page."""

    user_id: str | None = None
    role: str | None = None
    state: str | None = None  # one of STATES
    limit: int | None = None
    offset: int = 0
    now: float | None = None


# The effective states of `KeyRecord.state`, as SQL over (status, expires_at).
STATES: Final = MappingProxyType(
    {
        "active": "status = 'active' AND (expires_at IS NULL OR expires_at > ?)",
        "rotated": "status = 'rotated' AND (expires_at IS NULL OR expires_at > ?)",
        "expired": "status != 'revoked' AND expires_at IS NOT NULL AND expires_at <= ?",
        "revoked": "status = 'revoked'",
    }
)


def _where(query: KeyQuery) -> tuple[str, tuple[Any, ...]]:
    clauses: builtins.list[str] = []
    params: builtins.list[Any] = []
    if query.user_id is not None:
        clauses.append("user_id = ?")
        params.append(query.user_id)
    if query.role is not None:
        clauses.append("role = ?")
        params.append(query.role)
    if query.state is not None:
        if query.state not in STATES:
            raise FieldError("status", f"status must be one of {', '.join(STATES)}")
        clauses.append(STATES[query.state])
        if "?" in STATES[query.state]:
            params.append(time.time() if query.now is None else query.now)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


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
