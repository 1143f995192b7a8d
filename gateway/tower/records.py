"""What the embedded tower stores about a key (`KeyRecord`), the checks on what may be stored,
and the errors of the store."""

from __future__ import annotations

import builtins
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Final

from gateway.tower import MAX_FIELD_LENGTH, MAX_SCOPES

MIN_SECRET_BYTES: Final = 16


MAX_DAYS: Final = 36_500.0


MAX_METADATA_BYTES: Final = 8192


DAY: Final = 86_400.0


HOUR: Final = 3_600.0


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


def text_field(value: object, what: str, field: str | None = None) -> str:
    # The same limits `parse_answer` applies, so every stored key can be served.
    if not isinstance(value, str) or not value.strip():
        raise FieldError(field or what, f"{what} must be a non-empty string")
    if len(value) > MAX_FIELD_LENGTH or not value.isprintable():
        raise FieldError(
            field or what, f"{what} must be printable text of at most {MAX_FIELD_LENGTH} characters"
        )
    return value


def number_field(value: object, what: str, *, low: float, high: float, low_ok: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FieldError(what, f"{what} must be a number")
    if value < low or (value == low and not low_ok) or value > high:
        bound = f">= {low:g}" if low_ok else f"> {low:g}"
        raise FieldError(what, f"{what} must be {bound} and at most {high:g}, got {value:g}")
    return float(value)


def clean_scopes(scopes: Iterable[str]) -> builtins.list[str]:
    if isinstance(scopes, str):
        raise FieldError("scopes", "scopes must be a list of strings, not one string")
    if not isinstance(scopes, Iterable):
        raise FieldError("scopes", "scopes must be a list of strings")
    cleaned = sorted({text_field(s, "scope", "scopes") for s in scopes})
    if len(cleaned) > MAX_SCOPES:
        raise FieldError("scopes", f"at most {MAX_SCOPES} scopes")
    return cleaned


def clean_metadata(
    metadata: Mapping[str, Any] | None, *, team: str | None, rate_limit: float | None
) -> str:
    meta = dict(metadata or {})
    if team is not None:
        meta["team"] = team
    if rate_limit is not None:
        meta["rate_limit"] = rate_limit
    if meta.get("team") is not None:
        text_field(meta["team"], "team")
    if meta.get("rate_limit") is not None:
        number_field(meta["rate_limit"], "rate_limit", low=0, high=1e9, low_ok=False)
    try:
        encoded = json.dumps(meta, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise FieldError("metadata", f"metadata must be plain JSON: {exc}") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise FieldError("metadata", f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")
    return encoded


def record_from_row(row: tuple[Any, ...]) -> KeyRecord:
    values = list(row)
    values[4] = tuple(json.loads(values[4]))
    values[8] = MappingProxyType(json.loads(values[8]))
    return KeyRecord(*values)


def invalid_answer(reason: str) -> dict[str, Any]:
    return {"valid": False, "reason": reason}


def expiry_field(value: object, now: float) -> float | None:
    """A new `expires_at`: epoch seconds in the future (within MAX_DAYS), or None (never)."""
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
    state: str | None = None  # a key of `gateway.tower.store.STATES`
    limit: int | None = None
    offset: int = 0
    now: float | None = None
