"""What a tower says about a key, and the strict reading of its answer.

Every tower (the remote HTTP client, the embedded SQLite store) answers
`validate(key)` with an `Identity` or a `Rejection`, or raises `TowerFault`.
`parse_answer` is the single place a tower's JSON becomes one of those, so the
remote and embedded towers share exactly the same semantics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from sys import intern
from types import MappingProxyType
from typing import Any, Final, Protocol

from gateway.errors import TowerFault
from gateway.tower.constraints import NO_CONSTRAINTS, Constraints, parse_constraints

# Epoch seconds beyond this are almost surely milliseconds (year 5138): refuse
# rather than read them as a far-future expiry.
MAX_EPOCH_SECONDS: Final = 1e11
MAX_FIELD_LENGTH: Final = 256
MAX_SCOPES: Final = 256

REJECTION_REASONS: Final = frozenset({"invalid_key", "expired_key", "revoked_key"})


@dataclass(frozen=True, slots=True, eq=False)
class Identity:
    """Who a valid key belongs to, exactly as the tower granted it."""

    key_id: str
    user_id: str
    role: str
    scopes: tuple[str, ...] = ()
    expires_at: float | None = None
    team: str | None = None
    rate_limit: object = None
    # Tower metadata other than team and rate_limit.
    metadata: Mapping[str, Any] = field(default_factory=lambda: _NO_METADATA)
    # What the metadata restricts (CONTRACT section 11), parsed once per answer.
    constraints: Constraints = NO_CONSTRAINTS

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True, slots=True)
class Rejection:
    """The tower said the key is not valid; `reason` is a fixed reason id."""

    reason: str = "invalid_key"


TowerAnswer = Identity | Rejection


class Tower(Protocol):
    """Anything that can validate a key. Raises `TowerFault` when it cannot tell."""

    name: str

    async def validate(self, api_key: str) -> TowerAnswer: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def _clean_text(value: object, name: str, *, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise TowerFault("malformed", f"{name} is not a non-empty string")
    if len(value) > MAX_FIELD_LENGTH or not value.isprintable():
        raise TowerFault("malformed", f"{name} has control characters or is too long")
    return value


def _rejection_reason(body: Mapping[str, Any]) -> str:
    text = " ".join(str(body.get(k, "")) for k in ("reason", "error", "status")).lower()
    if "revok" in text:
        return "revoked_key"
    if "expir" in text:
        return "expired_key"
    return "invalid_key"


def parse_answer(status: int, body: object, *, now: float | None = None) -> TowerAnswer:
    """Read a tower's answer strictly; anything not clearly valid or invalid is a fault."""
    if not isinstance(body, dict):
        raise TowerFault("malformed", "body is not a JSON object")
    valid = body.get("valid")
    if valid is False:
        return Rejection(_rejection_reason(body))
    if valid is not True:
        raise TowerFault("malformed", "'valid' is not a boolean")
    if status != 200:
        raise TowerFault("malformed", f"'valid: true' with status {status}")

    key_id = _clean_text(body.get("key_id"), "key_id", required=True)
    user_id = _clean_text(body.get("user_id"), "user_id", required=True)
    role = _clean_text(body.get("role"), "role", required=True)
    assert key_id is not None and user_id is not None and role is not None

    raw_scopes = body.get("scopes", [])
    if raw_scopes is None:
        raw_scopes = []
    if not isinstance(raw_scopes, list) or len(raw_scopes) > MAX_SCOPES:
        raise TowerFault("malformed", "scopes is not a list of strings")
    # Roles, scopes and teams repeat across thousands of identities: interned,
    # every cached identity shares one copy of each string.
    scopes = tuple(
        sorted({intern(str(_clean_text(s, "scopes[]", required=True))) for s in raw_scopes})
    )

    expires_at = body.get("expires_at")
    if expires_at is not None:
        if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
            raise TowerFault("malformed", "expires_at is not a number of epoch seconds")
        if not math.isfinite(expires_at) or expires_at <= 0 or expires_at > MAX_EPOCH_SECONDS:
            raise TowerFault("malformed", "expires_at is not plausible epoch seconds")
        if expires_at <= (time.time() if now is None else now):
            return Rejection("expired_key")

    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise TowerFault("malformed", "metadata is not an object")
    team_raw = metadata.get("team")
    team = _clean_text(team_raw, "metadata.team", required=False) if team_raw != "" else None

    return Identity(
        key_id=key_id,
        user_id=user_id,
        role=intern(role),
        scopes=scopes,
        expires_at=float(expires_at) if expires_at is not None else None,
        team=intern(team) if team is not None else None,
        rate_limit=metadata.get("rate_limit"),
        metadata=_extra_metadata(metadata),
        constraints=parse_constraints(metadata),
    )


_NO_METADATA: Final[Mapping[str, Any]] = MappingProxyType({})


def _extra_metadata(metadata: dict[str, Any]) -> Mapping[str, Any]:
    """Metadata beyond `team` and `rate_limit` (which have their own fields).

    Most towers send nothing else; sharing one empty mapping then saves a dict
    per cached identity (about 200 bytes each at 100k identities).
    """
    extra = {k: v for k, v in metadata.items() if k not in ("team", "rate_limit")}
    return MappingProxyType(extra) if extra else _NO_METADATA
