"""Structured access log: one JSON line per request, written off the event loop.

Lines go through a bounded queue to a writer thread, so a slow, full or failing
sink drops lines (and counts them) instead of stalling requests. Every value is
JSON-escaped: a CR/LF in a header or path can never forge a line. No query
strings and no keys are logged; keys appear only as their keyed fingerprint.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Final

from aiohttp import hdrs, web

from gateway.errors import ConfigError
from gateway.tower import Identity

if TYPE_CHECKING:
    from gateway.config import Config

QUEUE_SIZE: Final = 10_000
MAX_FIELD: Final = 512
# A broken sink fails every line: say so at most this often, not once per request.
WARN_INTERVAL: Final = 60.0

log = logging.getLogger("tower_gateway.accesslog")


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
    # Set by the pipeline before any check, so an early refusal is still attributed.
    client: str | None = None
    method: str | None = None
    path: str | None = None
    missing: str | None = None  # the capability a 403 lacked
    trace_id: str | None = None  # W3C trace id (gateway.tracing): the client's, or a new one

    def identify(self, fingerprint: str, identity: Identity) -> None:
        self.fingerprint = fingerprint
        self.user = identity.user_id
        self.key_id = identity.key_id


def _clip(value: str | None) -> str | None:
    return value if value is None or len(value) <= MAX_FIELD else value[:MAX_FIELD] + "..."


def open_log_file(path: str, setting: str) -> IO[str]:
    """Open a log file for appending, line-buffered; a failure names the config key."""
    try:
        return open(path, "a", encoding="utf-8", buffering=1)
    except OSError as exc:
        raise ConfigError(setting, f"cannot open {path}: {exc.strerror or exc}") from None


class AccessLog:
    """Writes JSON lines to a stream from a background thread; never blocks the caller.

    Also the writer of the audit stream (`gateway.ops.audit`): any dict goes through `emit`.
    """

    def __init__(
        self,
        stream: IO[str] | None,
        *,
        enabled: bool = True,
        path: str | None = None,
        queue_size: int = QUEUE_SIZE,
        name: str = "access-log",
    ) -> None:
        self.enabled = enabled and stream is not None
        self._stream = stream
        self._path = path  # set when the stream is a file this writer opened (and may reopen)
        self._name = name
        self._queue: queue.Queue[str | None] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        # Two counters, each written by one thread only: no lock on the hot path.
        self._dropped_full = 0  # the event loop: queue full
        self._dropped_failed = 0  # the writer thread: the sink raised
        self._reopen = False
        self._warned_at = -WARN_INTERVAL

    @property
    def dropped(self) -> int:
        return self._dropped_full + self._dropped_failed

    @classmethod
    def from_config(cls, config: Config) -> AccessLog:
        if not config.log.access:
            return cls(None, enabled=False)
        return cls.to_target(config.log.file, setting="log.file")

    @classmethod
    def to_target(cls, target: str | None, *, setting: str, name: str = "access-log") -> AccessLog:
        """A writer to `stdout` (also for null), `stderr`, or a file path (appended to)."""
        if target is None or target == "stdout":
            return cls(sys.stdout, name=name)
        if target == "stderr":
            return cls(sys.stderr, name=name)
        return cls(open_log_file(target, setting), path=target, name=name)

    def reopen(self) -> None:
        """Reopen a file sink before the next line (after logrotate moved it); no-op otherwise."""
        if self._path is not None:
            self._reopen = True

    def write(
        self, request: web.BaseRequest, record: RequestRecord, *, decision: bool = False
    ) -> None:
        """One access line; `decision`: a decision listener's, naming the original request
        (`record.method`, `record.path`) instead of the decision request."""
        if not self.enabled:
            return
        line: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "type": "decision" if decision else "access",
            "request_id": record.request_id,
            "client": record.client or request.remote,
            "method": record.method if decision else request.method,
            "path": _clip(record.path if decision else request.path),
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
            "trace_id": record.trace_id,
        }
        self.emit(line)

    def emit(self, line: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        try:
            # ensure_ascii: every control or non-ASCII character becomes an escape.
            self._queue.put_nowait(json.dumps(line, ensure_ascii=True, default=str))
        except queue.Full:
            self._dropped_full += 1

    def _run(self) -> None:
        while True:
            line = self._queue.get()
            if line is None:
                return
            try:
                if self._reopen:
                    self._reopen_file()
                stream = self._stream
                assert stream is not None
                stream.write(line + "\n")
                if self._queue.empty():
                    stream.flush()
            except Exception as exc:
                # Any sink failure costs this line, never the writer thread (nor a request).
                self._dropped_failed += 1
                self._warn(exc)

    def _reopen_file(self) -> None:
        self._reopen = False
        assert self._path is not None
        fresh = open_log_file(self._path, self._name)  # the old file stays on failure
        old, self._stream = self._stream, fresh
        if old is not None:
            old.close()

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_INTERVAL:
            self._warned_at = now
            log.warning("%s: cannot write (%s); lines are dropped", self._name, type(exc).__name__)

    def close(self) -> None:
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=1)
            except queue.Full:
                return
            self._thread.join(timeout=2)
            if self._thread.is_alive():
                return  # a blocked sink: leave the daemon thread and its file alone
            self._thread = None
        if self._path is not None and self._stream is not None:
            self._stream.close()
            self._stream, self.enabled = None, False
