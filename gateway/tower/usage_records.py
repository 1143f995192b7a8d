"""The requests gateways report to the embedded tower (CONTRACT section 11), per key and
status: schema 2 of the key store, and the `KeyStore` methods that write and read it."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any, Final

# Version 2: the requests gateways report (CONTRACT section 11), per key and status.
USAGE_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS key_usage (
    key_id   TEXT NOT NULL,
    status   TEXT NOT NULL,
    requests INTEGER NOT NULL,
    PRIMARY KEY (key_id, status)
)
"""


class UsageRecords:
    """Mixed into `KeyStore`, which provides `_write` (one short transaction) and `_read`."""

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def record_usage(self, entries: Iterable[Mapping[str, Any]]) -> int:
        """Adds a gateway's usage report (`gateway.tower.usage.parse_report` entries) in one
        transaction; entries of unknown keys are skipped. Returns how many keys were known."""
        known = 0
        with self._write() as conn:
            for entry in entries:
                key_id = entry["key_id"]
                updated = conn.execute(
                    "UPDATE api_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?)"
                    " WHERE key_id = ?",
                    (entry["last_used_at"], key_id),
                ).rowcount
                if not updated:
                    continue
                known += 1
                conn.executemany(
                    "INSERT INTO key_usage (key_id, status, requests) VALUES (?, ?, ?)"
                    " ON CONFLICT (key_id, status) DO UPDATE SET requests = requests + ?",
                    [(key_id, st, n, n) for st, n in entry["statuses"].items()],
                )
        return known

    def usage(self, key_id: str | None = None) -> dict[str, dict[str, int]]:
        """Reported requests by key_id and status (all keys, or one)."""
        sql = "SELECT key_id, status, requests FROM key_usage"
        rows = (
            self._read(sql + " WHERE key_id = ?", (key_id,))
            if key_id is not None
            else self._read(sql)
        )
        out: dict[str, dict[str, int]] = {}
        for kid, status, requests in rows:
            out.setdefault(kid, {})[status] = requests
        return out
