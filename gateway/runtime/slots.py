"""The pieces of a worker group: a worker's slot, a fanned-out reply, the restart back-off,
and the environment a worker process starts with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import site
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

BACKOFF_BASE: Final = 0.5
BACKOFF_MAX: Final = 30.0
WORKER_LABEL: Final = "worker"


def backoff(quick_exits: int) -> float:
    """Seconds to wait before restarting a worker after `quick_exits` short-lived runs."""
    if quick_exits <= 0:
        return 0.0
    return float(min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (quick_exits - 1)))



@dataclass(eq=False)
class WorkerSlot:
    """One worker position; its process is replaced when it dies."""

    index: int
    socket_path: str
    process: asyncio.subprocess.Process | None = None
    session: aiohttp.ClientSession | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    restarts: int = 0
    quick_exits: int = 0
    last_exit: int | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def describe(self) -> dict[str, Any]:
        return {
            "worker": self.index,
            "pid": self.process.pid if self.alive and self.process else None,
            "ready": self.ready.is_set(),
            "restarts": self.restarts,
            "uptime_seconds": round(time.monotonic() - self.started_at, 3) if self.alive else 0,
            "last_exit": self.last_exit,
        }


@dataclass(frozen=True, slots=True)
class Reply:
    """A worker's answer to a fanned-out request; status 0 when it did not answer."""

    worker: int
    status: int
    body: bytes = b""
    error: str | None = None

    def json(self) -> Any:
        return json.loads(self.body)


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


def worker_env() -> dict[str, str]:
    """The parent's environment, plus the directory this package was imported from.

    A worker must run the same code as its parent, also when the parent runs
    from a source checkout that is not installed. An installed package needs
    nothing: adding site-packages to PYTHONPATH would reorder the import path.
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    installed = {
        str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]
    }
    if root not in installed:
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in parts:
            env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return env
