"""The audit trail: every authentication decision and every admin action.

Events are JSON lines (`"type": "audit"`) written like the access log, through a
bounded queue and a writer thread, so a slow or failing sink drops lines instead
of stalling requests; the most recent events are also kept in a bounded ring for
`GET /admin/audit`. Keys appear only as their keyed fingerprint. Two shapes:

    {"event": "auth", "outcome": "success" | "failure",
     "decision": "allow" | "deny" | "would_deny" | "error", "reason": <reason id>,
     "request_id", "client", "method", "path", "route", "key", "user", "key_id", "role",
     "missing_capability" (a 403), "source" (a success: hit | tower | stale), "trace_id"}
    {"event": "admin", "action": <cache_clear | cache_drop | reload | revocation_webhook |
     explain | admin_denied | keys_list | key_create | key_show | key_update | key_revoke |
     key_rotate>, "outcome": "success" | "failure", "client", ...details}
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from gateway.ops.accesslog import AccessLog, RequestRecord

if TYPE_CHECKING:
    from gateway.config import Config

RING_SIZE: Final = 1000
MAX_LIMIT: Final = RING_SIZE
DEFAULT_LIMIT: Final = 100
MAX_TEXT: Final = 512
MAX_LIST: Final = 50  # a revocation of a thousand key_ids is audited by its first ones


def _bounded(value: Any) -> Any:
    """Clip long strings and lists: an event stays small whatever a client sent."""
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "..."
    if isinstance(value, list | tuple):
        return [_bounded(v) for v in value[:MAX_LIST]]
    return value


# What `AuditLog.auth` keeps of one attempt, in `_auth_line`'s order.
_AuthEvent = tuple[Any, ...]


def _auth_line(event: _AuthEvent) -> dict[str, Any]:
    (ts, seq, decision, reason, request_id, client, method, path, route) = event[:9]
    (key, user, key_id, role, missing, source, trace_id) = event[9:]
    line: dict[str, Any] = {
        "ts": round(ts, 3),
        "seq": seq,
        "type": "audit",
        "event": "auth",
        "outcome": "success" if decision == "allow" else "failure",
        "decision": decision,
        "reason": reason,
        "request_id": request_id,
        "client": client,
        "method": method,
        "path": _bounded(path),
        "route": route,
        "key": key,
        "user": user,
        "key_id": key_id,
        "role": role,
    }
    if missing is not None:
        line["missing_capability"] = missing
    if decision == "allow":
        line["source"] = source
    line["trace_id"] = trace_id
    return line


class AuditLog:
    """Emits audit events to a writer and keeps the last `capacity` of them in memory."""

    def __init__(self, writer: AccessLog, *, capacity: int = RING_SIZE) -> None:
        self._writer = writer
        self._ring: deque[dict[str, Any] | _AuthEvent] = deque(maxlen=capacity)
        # A per-process sequence: orders events written in the same millisecond.
        self._seq = itertools.count(1)

    @classmethod
    def from_config(cls, config: Config) -> AuditLog:
        target = config.log.audit
        if target is None:
            return cls(AccessLog(None, enabled=False))
        return cls(AccessLog.to_target(target, setting="log.audit", name="audit-log"))

    @property
    def dropped(self) -> int:
        return self._writer.dropped

    def emit(self, event: str, **fields: Any) -> None:
        line: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "seq": next(self._seq),
            "type": "audit",
            "event": event,
        }
        line.update((name, _bounded(value)) for name, value in fields.items())
        self._ring.append(line)
        self._writer.emit(line)

    def auth(self, record: RequestRecord, *, decision: str, reason: str | None) -> None:
        """One authentication attempt, from what the pipeline recorded about it."""
        # This runs for every authenticated request: the ring keeps a tuple, made
        # into the event's dict only when it is written or read. Only the path
        # comes from the client unbounded; tower fields are bounded when the
        # answer is read.
        event = (
            time.time(),
            next(self._seq),
            decision,
            reason,
            record.request_id,
            record.client,
            record.method,
            record.path,
            record.route,
            record.fingerprint,
            record.user,
            record.key_id,
            record.role,
            record.missing,
            record.reason,
            record.trace_id,
        )
        if self._writer.enabled:
            line = _auth_line(event)
            self._ring.append(line)
            self._writer.emit(line)
        else:
            self._ring.append(event)

    def admin(self, action: str, *, client: str | None, ok: bool = True, **details: Any) -> None:
        """One admin action on the ops listener."""
        self.emit(
            "admin",
            action=action,
            outcome="success" if ok else "failure",
            client=client,
            **details,
        )

    def recent(self, limit: int = DEFAULT_LIMIT) -> list[dict[str, Any]]:
        """The newest `limit` events, newest first."""
        newest = itertools.islice(reversed(self._ring), max(0, limit))
        return [e if isinstance(e, dict) else _auth_line(e) for e in newest]

    def reopen(self) -> None:
        self._writer.reopen()

    def close(self) -> None:
        self._writer.close()


def parse_limit(raw: str | None) -> int:
    """`?limit=` of `GET /admin/audit`: 1..MAX_LIMIT, DEFAULT_LIMIT when absent."""
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)
