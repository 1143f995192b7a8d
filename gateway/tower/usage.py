"""Usage reports to the tower (CONTRACT section 11): how often each key was used, and how.

    request ──record(key_id, status)──> UsageRecorder (a dict per process, bounded)
    every `interval` seconds ──take()──> UsageReporter ──send──> POST {tower.url}/api/v1/usage
                                         (or the embedded tower's store, in process)

Recording is a dict update on the request path; the report is sent by a background task, so a
slow or failing tower never delays or fails a request. A report that fails is merged back and
sent with the next one. At most `max_keys` keys are held: when that many are waiting, the
report is sent early, and uses of further keys until it is sent are dropped and counted (memory
stays bounded however many keys are active). Each process reports its own counts; the tower
adds them up. Reports carry key_ids, never a key.

The body:

    {"keys": [{"key_id": "k1", "requests": 12, "last_used_at": 1796650000.5,
               "statuses": {"200": 11, "429": 1}}, ...]}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import ClientSession, ClientTimeout

from gateway.config import TowerConfig
from gateway.tower.client import TOWER_SECRET_HEADER

log = logging.getLogger(__name__)

USAGE_PATH: Final = "/api/v1/usage"
MAX_REPORT_KEYS: Final = 10_000
MAX_STATUSES: Final = 64
MAX_KEY_ID: Final = 256
FINAL_REPORT_SECONDS: Final = 2.0

Entry = dict[str, Any]
Send = Callable[[list[Entry]], Awaitable[None]]


class _Usage:
    __slots__ = ("last", "requests", "statuses")

    def __init__(self) -> None:
        self.requests = 0
        self.last = 0.0
        self.statuses: dict[int, int] = {}


class UsageRecorder:
    """The counts of this process since the last report; `record` is the hot-path call."""

    def __init__(self, *, max_keys: int = MAX_REPORT_KEYS, clock: Callable[[], float] = time.time):
        self._max_keys = max_keys
        self._clock = clock
        self._counts: dict[str, _Usage] = {}
        self.dropped = 0  # uses not counted because max_keys keys were already waiting
        self.full = asyncio.Event()

    def __len__(self) -> int:
        return len(self._counts)

    def record(self, key_id: str, status: int) -> None:
        usage = self._counts.get(key_id)
        if usage is None:
            if len(self._counts) >= self._max_keys:
                self.dropped += 1
                self.full.set()
                return
            usage = self._counts[key_id] = _Usage()
        usage.requests += 1
        usage.last = self._clock()
        statuses = usage.statuses
        statuses[status] = statuses.get(status, 0) + 1

    def take(self) -> dict[str, _Usage]:
        """Everything counted so far; counting starts afresh."""
        taken, self._counts = self._counts, {}
        self.full.clear()
        return taken

    def restore(self, taken: dict[str, _Usage]) -> None:
        """Merges back a batch the tower did not take, within the bound."""
        counts = self._counts
        for key_id, old in taken.items():
            usage = counts.get(key_id)
            if usage is None:
                if len(counts) >= self._max_keys:
                    self.dropped += old.requests
                    continue
                counts[key_id] = old
                continue
            usage.requests += old.requests
            usage.last = max(usage.last, old.last)
            for status, n in old.statuses.items():
                usage.statuses[status] = usage.statuses.get(status, 0) + n


def report_body(taken: dict[str, _Usage]) -> list[Entry]:
    return [
        {
            "key_id": key_id,
            "requests": usage.requests,
            "last_used_at": round(usage.last, 3),
            "statuses": {str(status): n for status, n in sorted(usage.statuses.items())},
        }
        for key_id, usage in taken.items()
    ]


class UsageReporter:
    """Sends the recorder's counts every `interval` seconds (or sooner when it is full)."""

    def __init__(
        self,
        recorder: UsageRecorder,
        send: Send,
        *,
        interval: float,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        self.recorder = recorder
        self._send = send
        self._interval = interval
        self._on_result = on_result
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-reporter")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.recorder.full.wait(), self._interval)
            await self.flush()

    async def flush(self) -> bool:
        """Sends what was counted; True when the tower took it (or there was nothing)."""
        taken = self.recorder.take()
        if not taken:
            return True
        try:
            await self._send(report_body(taken))
        except Exception as exc:  # any failure: kept for the next report, never raised
            self.recorder.restore(taken)
            if not self._failing:
                log.warning("usage report failed (%s); retried with the next one", exc)
            self._failing = True
            self._result(False)
            return False
        if self._failing:
            log.info("usage reports are accepted again")
        self._failing = False
        self._result(True)
        return True

    def _result(self, ok: bool) -> None:
        if self._on_result is not None:
            self._on_result(ok)

    async def close(self) -> None:
        """Stops the loop and sends what is left, waiting at most FINAL_REPORT_SECONDS."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FINAL_REPORT_SECONDS):
                await self.flush()


class ReportRefused(Exception):
    """The tower answered a usage report with something other than 2xx."""


def http_sender(config: TowerConfig) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """A sender posting to `{tower.url}/api/v1/usage` with the tower credentials, and its
    close. The session is created on first use (it belongs to the running loop)."""
    assert config.url is not None
    url = config.url.rstrip("/") + USAGE_PATH
    headers = {
        "Authorization": f"Bearer {config.api_key}",
        TOWER_SECRET_HEADER: str(config.secret),
    }
    sessions: list[ClientSession] = []

    async def send(entries: list[Entry]) -> None:
        if not sessions:
            sessions.append(ClientSession(timeout=ClientTimeout(total=config.timeout)))
        async with sessions[0].post(
            url, json={"keys": entries}, headers=headers, allow_redirects=False
        ) as response:
            if not 200 <= response.status < 300:
                raise ReportRefused(f"tower answered {response.status}")

    async def close() -> None:
        for session in sessions:
            await session.close()

    return send, close


def parse_report(body: object) -> list[Entry]:
    """A usage report as the embedded tower takes it; raises ValueError with what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
        raise ValueError('body must be {"keys": [...]}')
    keys = body["keys"]
    if len(keys) > MAX_REPORT_KEYS:
        raise ValueError(f"at most {MAX_REPORT_KEYS} keys per report")
    out = []
    for i, entry in enumerate(keys):
        if not isinstance(entry, dict):
            raise ValueError(f"keys[{i}] is not an object")
        key_id, requests = entry.get("key_id"), entry.get("requests")
        last, statuses = entry.get("last_used_at"), entry.get("statuses", {})
        if not isinstance(key_id, str) or not key_id or len(key_id) > MAX_KEY_ID:
            raise ValueError(f"keys[{i}].key_id is not a key id")
        if not _count(requests):
            raise ValueError(f"keys[{i}].requests is not a count")
        if isinstance(last, bool) or not isinstance(last, int | float) or not math.isfinite(last):
            raise ValueError(f"keys[{i}].last_used_at is not epoch seconds")
        if not isinstance(statuses, dict) or len(statuses) > MAX_STATUSES:
            raise ValueError(f"keys[{i}].statuses is not an object")
        for status, n in statuses.items():
            if not (status.isdigit() and len(status) == 3) or not _count(n):
                raise ValueError(f"keys[{i}].statuses has a bad entry")
        out.append(
            {"key_id": key_id, "requests": requests, "last_used_at": float(last),
             "statuses": dict(statuses)}
        )  # fmt: skip
    return out


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10**12


def usage_sender(
    config: TowerConfig, store: Any = None
) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """Where reports go: the embedded tower's store when it runs in this process (`store`),
    else `POST {tower.url}/api/v1/usage`."""
    if store is None:
        return http_sender(config)

    async def send(entries: list[Entry]) -> None:
        await asyncio.to_thread(store.record_usage, parse_report({"keys": entries}))

    async def close() -> None:
        return None

    return send, close
