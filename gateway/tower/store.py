"""`KeyStore`: API keys in a SQLite file (WAL), stored only as keyed hashes; create, list,
revoke, rotate, update, look up, and count usage in batches. Safe for several processes at once."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from gateway.tower import keyformat
from gateway.tower.records import (
    DAY,
    HOUR,
    MAX_DAYS,
    MIN_SECRET_BYTES,
    FieldError,
    KeyNotFound,
    KeyQuery,
    KeyRecord,
    KeyStateError,
    StoreError,
    clean_metadata,
    clean_scopes,
    expiry_field,
    invalid_answer,
    number_field,
    record_from_row,
    text_field,
)

SCHEMA_VERSION: Final = 1


# How long a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT_SECONDS: Final = 5.0


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
            text_field(user_id, "user_id"),
            text_field(role, "role"),
            json.dumps(clean_scopes(scopes)),
            None
            if expires_in_days is None
            else now
            + DAY
            * number_field(expires_in_days, "expires_in_days", low=0, high=MAX_DAYS, low_ok=False),
            clean_metadata(metadata, team=team, rate_limit=rate_limit),
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
        return record_from_row(rows[0])

    def revoke(self, key_id: str, reason: str = "revoked") -> KeyRecord:
        """Refuse the key from now on; revoking twice keeps the first revocation."""
        reason = text_field(reason, "reason")
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
        grace = HOUR * number_field(
            grace_hours, "grace_hours", low=0, high=MAX_DAYS * 24, low_ok=True
        )
        now = time.time()
        with self._write() as conn:
            row = conn.execute(_SELECT_RECORDS + _BY_ID, (key_id,)).fetchone()
            if row is None:
                raise KeyNotFound(f"no key with id {key_id!r}")
            old = record_from_row(row)
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
            return invalid_answer("invalid_key")
        self.queries += 1
        rows = self._read(
            "SELECT key_id, user_id, role, scopes, expires_at, metadata, status, grace_until"
            " FROM api_keys WHERE key_hash = ?",
            (self._hash(raw_key),),
        )
        if not rows:
            return invalid_answer("invalid_key")
        key_id, user_id, role, scopes, expires_at, metadata, status, grace_until = rows[0]
        now = time.time() if now is None else now
        if status == "revoked":
            return invalid_answer("revoked_key")
        if status not in ("active", "rotated"):
            return invalid_answer("invalid_key")
        if (expires_at is not None and expires_at <= now) or (
            grace_until is not None and grace_until <= now
        ):
            return invalid_answer("expired_key")
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
        default) and `team`. An expired key may be extended; a revoked or rotated one
        cannot change.
        """
        now = time.time()
        columns: dict[str, Any] = {}
        meta_changes: dict[str, Any] = {}
        for name, value in changes.items():
            if name == "role":
                columns["role"] = text_field(value, "role")
            elif name == "scopes":
                columns["scopes"] = json.dumps(clean_scopes(value))
            elif name == "expires_at":
                columns["expires_at"] = expiry_field(value, now)
            elif name in ("team", "rate_limit"):
                meta_changes[name] = value
            else:
                raise FieldError(name, f"{name} cannot be changed")
        with self._write() as conn:
            row = conn.execute(_SELECT_RECORDS + _BY_ID, (key_id,)).fetchone()
            if row is None:
                raise KeyNotFound(f"no key with id {key_id!r}")
            old = record_from_row(row)
            if old.status != "active":
                raise KeyStateError(f"key {key_id} is {old.state(now)} and cannot be changed")
            if meta_changes:
                meta = {**old.metadata, **meta_changes}
                columns["metadata"] = clean_metadata(
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
        return [record_from_row(row) for row in self._read(sql, params)]


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
