"""Deadlines of upstream exchanges, checked by one periodic tick instead of a timer each.

A timer per request (`asyncio.timeout`, aiohttp's `sock_read`) is about 2% of what
a cached request costs. Here a task's deadline is an entry in a dict, set and
cleared for an insert and a pop; while any is pending, one tick every
`resolution` seconds cancels the tasks whose deadline has passed, as
`asyncio.timeout` does, and `finish` tells that cancellation (withdrawn, to be
answered as a timeout) from any other (left to propagate). A deadline fires up
to `resolution` late.

    deadlines.arm(task, seconds)
    try:
        answer = await upstream()
    except asyncio.CancelledError:
        if deadlines.finish(task):
            raise TimeoutError from None
        raise
    deadlines.finish(task)
"""

from __future__ import annotations

import asyncio
from typing import Final

RESOLUTION: Final = 0.05  # seconds


class Deadlines:
    """The pending deadlines of the tasks of one event loop, at most one per task."""

    __slots__ = ("_fired", "_loop", "_pending", "_resolution", "_tick")

    def __init__(self, resolution: float = RESOLUTION) -> None:
        self._resolution = resolution
        self._loop: asyncio.AbstractEventLoop | None = None
        # task -> (when it is due, its `cancelling()` count when armed)
        self._pending: dict[asyncio.Task[object], tuple[float, int]] = {}
        self._fired: dict[asyncio.Task[object], int] = {}
        self._tick: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def arm(self, task: asyncio.Task[object], seconds: float) -> None:
        """`task` is cancelled once `seconds` pass, unless `finish` comes first."""
        loop = self._loop
        if loop is None:
            loop = self._loop = task.get_loop()
        self._pending[task] = (loop.time() + seconds, task.cancelling())
        if self._tick is None:
            self._tick = loop.call_later(self._resolution, self._check)

    def restart(self, task: asyncio.Task[object], seconds: float) -> None:
        """Progress: a pending deadline is due `seconds` from now again."""
        entry = self._pending.get(task)
        if entry is not None:
            assert self._loop is not None
            self._pending[task] = (self._loop.time() + seconds, entry[1])

    def finish(self, task: asyncio.Task[object]) -> bool:
        """Clears the task's deadline. True when it had fired and the cancellation was
        its alone: that cancellation is withdrawn, and the caller answers a timeout."""
        self._pending.pop(task, None)
        if not self._fired:
            return False
        cancelling = self._fired.pop(task, None)
        return cancelling is not None and task.uncancel() <= cancelling

    def _check(self) -> None:
        self._tick = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        due = [task for task, (when, _) in self._pending.items() if when <= now]
        for task in due:
            _, cancelling = self._pending.pop(task)
            if not task.done():  # a task that ended without `finish` is only forgotten
                self._fired[task] = cancelling
                task.cancel()
        if self._pending:
            self._tick = loop.call_later(self._resolution, self._check)
