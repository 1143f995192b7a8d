"""Structured access log: one JSON line per request, written off the event loop.

Lines go through a bounded queue to a writer thread, so a slow, full or failing
sink drops lines (and counts them) instead of stalling requests. Every value is
JSON-escaped: a CR/LF in a header or path can never forge a line. No query
strings and no keys are logged; keys appear only as their keyed fingerprint.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Final

from aiohttp import hdrs, web

from gateway.tower import Identity

if TYPE_CHECKING:
    from gateway.config import Config

QUEUE_SIZE: Final = 10_000
MAX_FIELD: Final = 512


@dataclass(slots=True)
class RequestRecord:
    """What the pipeline learned about one request, for the log and the audit trail."""

    request_id: str
    route: str = "unmatched"
    status: int = 0
    duration: float = 0.0
    decision: str | None = None
    reason: str | None = None
    fingerprint: str | None = None
    user: str | None = None
    key_id: str | None = None
    role: str | None = None

    def identify(self, fingerprint: str, identity: Identity) -> None:
        self.fingerprint = fingerprint
        self.user = identity.user_id
        self.key_id = identity.key_id


def _clip(value: str | None) -> str | None:
    return value if value is None or len(value) <= MAX_FIELD else value[:MAX_FIELD] + "..."


class AccessLog:
    """Writes JSON lines to a stream from a background thread; never blocks the caller."""

    def __init__(self, stream: IO[str] | None, *, enabled: bool = True) -> None:
        self.enabled = enabled and stream is not None
        self.dropped = 0
        self._stream = stream
        self._queue: queue.Queue[str | None] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: Config) -> AccessLog:
        return cls(sys.stdout, enabled=config.log.access)

    def write(self, request: web.BaseRequest, record: RequestRecord) -> None:
        if not self.enabled:
            return
        line: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "type": "access",
            "request_id": record.request_id,
            "client": request.remote,
            "method": request.method,
            "path": _clip(request.path),
            "route": record.route,
            "status": record.status,
            "duration_ms": round(record.duration * 1000, 3),
            "decision": record.decision,
            "reason": record.reason,
            "key": record.fingerprint,
            "user": _clip(record.user),
            "key_id": _clip(record.key_id),
            "role": record.role,
            "user_agent": _clip(request.headers.get(hdrs.USER_AGENT)),
        }
        self.emit(line)

    def emit(self, line: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()
        try:
            # ensure_ascii: every control or non-ASCII character becomes an escape.
            self._queue.put_nowait(json.dumps(line, ensure_ascii=True, default=str))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        stream = self._stream
        assert stream is not None
        while True:
            line = self._queue.get()
            if line is None:
                return
            try:
                stream.write(line + "\n")
                if self._queue.empty():
                    stream.flush()
            except (OSError, ValueError):
                self.dropped += 1

    def close(self) -> None:
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=1)
            except queue.Full:
                return
            self._thread.join(timeout=2)
            self._thread = None
