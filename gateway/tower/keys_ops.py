"""Key management operations, shared by the `keys` CLI and the admin API (`gateway.ops.keys_api`).

The store (`gateway.tower.store.KeyStore`) owns every rule about a key; this
module owns the names both front ends speak: the fields a request may carry
(checked here, so the CLI and the API refuse the same input with the same
message), the effective status names of CONTRACT section 13, and the JSON view
of a key, which never holds a secret.

Extension point: CONTRACT section 11's per-key constraints (`allowed_ips`,
`allowed_origins`, `quota`, `rate_limit_scope`) are not stored yet. A request
that sets one is refused as 400 naming it; once the store keeps them, add them
to `CREATE_FIELDS`, `UPDATE_FIELDS`, the store's `update` and `key_json`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.tower.records import DAY, MAX_DAYS, FieldError, KeyQuery, KeyRecord
from gateway.tower.store import KeyStore

# Effective statuses as the API names them, and as `KeyRecord.state` does.
STATUSES: Final = ("active", "rotating", "expired", "revoked")
_STORE_STATE: Final = {"rotating": "rotated"}
_API_STATUS: Final = {"rotated": "rotating"}

CONSTRAINTS: Final = ("allowed_ips", "allowed_origins", "quota", "rate_limit_scope")
CREATE_FIELDS: Final = frozenset(
    {"user_id", "role", "scopes", "expires_in_days", "env", "rate_limit", "team"}
)
UPDATE_FIELDS: Final = frozenset(
    {"role", "scopes", "expires_at", "expires_in_days", "rate_limit", "team"}
)
QUERY_FIELDS: Final = frozenset({"user_id", "role", "status", "limit", "offset"})
MAX_PAGE: Final = 10_000
DEFAULT_GRACE_HOURS: Final = 24.0
DEFAULT_REASON: Final = "revoked"


@dataclass(frozen=True, slots=True)
class NewKey:
    """What `keys create` and `POST /admin/keys` ask for."""

    user_id: str
    role: str
    scopes: tuple[str, ...] = ()
    expires_in_days: float | None = None
    env: str = "test"
    rate_limit: float | None = None
    team: str | None = None


def status(record: KeyRecord, now: float | None = None) -> str:
    state = record.state(now)
    return _API_STATUS.get(state, state)


def key_json(record: KeyRecord, now: float | None = None) -> dict[str, Any]:
    """A key as the API shows it: everything but the secret, which is never stored."""
    return {
        "key_id": record.key_id,
        "prefix": record.display_prefix,
        "user_id": record.user_id,
        "role": record.role,
        "scopes": list(record.scopes),
        "env": record.env,
        "status": status(record, now),
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "last_used_at": record.last_used_at,
        "requests": record.use_count,
        "team": record.metadata.get("team"),
        "rate_limit": record.metadata.get("rate_limit"),
        "revoked_at": record.revoked_at,
        "revoke_reason": record.revoke_reason,
        "grace_until": record.grace_until,
        "rotated_to": record.rotated_to,
    }


def usage_json(record: KeyRecord) -> dict[str, Any]:
    """The request counts of one key. `statuses` (counts by HTTP status) stays null until the
    store records them (CONTRACT section 11's usage reports)."""
    return {"requests": record.use_count, "last_used_at": record.last_used_at, "statuses": None}


# --------------------------------------------------------------------------- parsing requests


def _check_names(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for name in body:
        if name in CONSTRAINTS:
            raise FieldError(
                name, f"{name} is not supported by this key store yet (CONTRACT section 11)"
            )
        if name not in allowed:
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise FieldError(shown, f"unknown field {shown!r}")


def _object(body: object) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise FieldError("body", "the body must be a JSON object")
    return body


def _scopes(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise FieldError("scopes", "scopes must be a list of strings")
    return tuple(value)


def _optional_text(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise FieldError(name, f"{name} must be a string or null")
    return value


def _days(value: object, name: str = "expires_in_days") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError(name, f"{name} must be a number of days or null")
    return float(value)


def parse_create(body: object) -> NewKey:
    """The fields of a new key, checked for names and shapes (the store checks values)."""
    body = _object(body)
    _check_names(body, CREATE_FIELDS)
    for name in ("user_id", "role"):
        if body.get(name) is None:
            raise FieldError(name, f"{name} is required")
        if not isinstance(body[name], str):
            raise FieldError(name, f"{name} must be a string")
    env = body.get("env", "test")
    if not isinstance(env, str):
        raise FieldError("env", "env must be a string")
    return NewKey(
        user_id=body["user_id"],
        role=body["role"],
        scopes=_scopes(body.get("scopes")),
        expires_in_days=_days(body.get("expires_in_days")),
        env=env,
        rate_limit=body.get("rate_limit"),
        team=_optional_text(body, "team"),
    )


def parse_update(body: object, now: float | None = None) -> dict[str, Any]:
    """The changes of `PATCH /admin/keys/{key_id}` (and `keys update`) for `KeyStore.update`.

    `expires_in_days` is a convenience for `expires_at` (now plus that many days);
    both at once are refused. An empty change is refused too: it is always a mistake.
    """
    body = _object(body)
    _check_names(body, UPDATE_FIELDS)
    if not body:
        raise FieldError(
            "body", f"nothing to change: give one of {', '.join(sorted(UPDATE_FIELDS))}"
        )
    changes = dict(body)
    if "expires_in_days" in changes:
        if "expires_at" in changes:
            raise FieldError("expires_in_days", "give expires_at or expires_in_days, not both")
        days = _days(changes.pop("expires_in_days"))
        if days is not None and not 0 < days <= MAX_DAYS:
            raise FieldError(
                "expires_in_days", f"expires_in_days must be > 0 and at most {MAX_DAYS:g}"
            )
        start = time.time() if now is None else now
        changes["expires_at"] = None if days is None else start + DAY * days
    if "scopes" in changes:
        changes["scopes"] = list(_scopes(changes["scopes"]))
    for name in ("role", "team"):
        if name in changes:
            changes[name] = _optional_text(changes, name)
    if "role" in changes and changes["role"] is None:
        raise FieldError("role", "role must be a string")
    return changes


def parse_query(params: Mapping[str, str]) -> KeyQuery:
    """The filters and page of `GET /admin/keys?user_id=&role=&status=&limit=&offset=`."""
    _check_names(params, QUERY_FIELDS)
    state = params.get("status")
    if state is not None and state not in STATUSES:
        raise FieldError("status", f"status must be one of {', '.join(STATUSES)}")
    limit = _count(params.get("limit"), "limit", low=1, high=MAX_PAGE)
    offset = _count(params.get("offset"), "offset", low=0, high=2**62)
    return KeyQuery(
        user_id=params.get("user_id") or None,
        role=params.get("role") or None,
        state=None if state is None else _STORE_STATE.get(state, state),
        limit=limit,
        offset=offset or 0,
    )


def _count(raw: str | None, name: str, *, low: int, high: int) -> int | None:
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise FieldError(name, f"{name} must be an integer from {low} to {high}")
    return int(raw)


def parse_rotate(body: object) -> float:
    body = _object(body)
    _check_names(body, frozenset({"grace_hours"}))
    value = body.get("grace_hours", DEFAULT_GRACE_HOURS)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError("grace_hours", "grace_hours must be a number")
    return float(value)


def parse_revoke(body: object) -> str:
    body = _object(body)
    _check_names(body, frozenset({"reason"}))
    reason = body.get("reason", DEFAULT_REASON)
    if not isinstance(reason, str):
        raise FieldError("reason", "reason must be a string")
    return reason


# --------------------------------------------------------------------------- operations


def create_key(store: KeyStore, new: NewKey) -> tuple[str, KeyRecord]:
    """A new key; the raw key is returned here only."""
    return store.create(
        new.user_id,
        new.role,
        scopes=new.scopes,
        expires_in_days=new.expires_in_days,
        env=new.env,
        rate_limit=new.rate_limit,
        team=new.team,
    )


def list_keys(store: KeyStore, query: KeyQuery) -> tuple[list[KeyRecord], int]:
    """One page of keys and how many match in all."""
    records = store.list(query)
    if query.limit is None and not query.offset:
        return records, len(records)
    return records, store.count(query)


def update_key(store: KeyStore, key_id: str, changes: Mapping[str, Any]) -> KeyRecord:
    return store.update(key_id, changes)


def revoke_key(store: KeyStore, key_id: str, reason: str = DEFAULT_REASON) -> KeyRecord:
    return store.revoke(key_id, reason=reason)


def rotate_key(
    store: KeyStore, key_id: str, grace_hours: float = DEFAULT_GRACE_HOURS
) -> tuple[str, KeyRecord, KeyRecord]:
    """The new raw key, the new record and the old one (now valid until its grace ends)."""
    raw, new = store.rotate(key_id, grace_hours=grace_hours)
    return raw, new, store.get(key_id)
