"""Deadlines on one tick: a deadline fires as a cancellation the owner turns into a
timeout, any other cancellation still propagates, and no tick runs while idle."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.proxy.deadlines import Deadlines


async def guarded(deadlines: Deadlines, seconds: float, work: float) -> str:
    """`work` seconds of waiting under a `seconds` deadline, as the forwarder runs one."""
    task = asyncio.current_task()
    assert task is not None
    deadlines.arm(task, seconds)
    try:
        await asyncio.sleep(work)
    except asyncio.CancelledError:
        if deadlines.finish(task):
            return "timeout"
        raise
    deadlines.finish(task)
    return "done"


async def test_work_within_its_deadline_finishes() -> None:
    deadlines = Deadlines(resolution=0.01)
    assert await guarded(deadlines, 0.5, 0.02) == "done"
    assert len(deadlines) == 0


async def test_a_passed_deadline_is_a_timeout_not_a_cancellation() -> None:
    deadlines = Deadlines(resolution=0.01)
    started = time.monotonic()
    assert await guarded(deadlines, 0.1, 5) == "timeout"
    assert 0.09 < time.monotonic() - started < 1.0
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the cancellation was withdrawn


async def test_many_deadlines_fire_each_on_its_own() -> None:
    deadlines = Deadlines(resolution=0.01)
    results = await asyncio.gather(
        *(guarded(deadlines, 0.1, 0.3 if i % 2 else 0.01) for i in range(20))
    )
    assert results == ["timeout" if i % 2 else "done" for i in range(20)]
    assert len(deadlines) == 0


async def test_restart_pushes_the_deadline_back() -> None:
    deadlines = Deadlines(resolution=0.01)
    owner = asyncio.ensure_future(guarded(deadlines, 0.15, 0.4))
    await asyncio.sleep(0)  # armed
    for _ in range(4):  # progress every 0.1 s: never 0.15 s without it
        await asyncio.sleep(0.1)
        deadlines.restart(owner, 0.15)  # type: ignore[arg-type]
    assert await owner == "done"


async def test_a_cancellation_from_elsewhere_still_propagates() -> None:
    deadlines = Deadlines(resolution=0.01)
    owner = asyncio.ensure_future(guarded(deadlines, 5, 5))
    await asyncio.sleep(0.02)
    owner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owner
    assert len(deadlines) == 0


async def test_a_cancellation_together_with_the_deadline_is_not_swallowed() -> None:
    deadlines = Deadlines(resolution=60)  # the tick is driven by hand below
    owner = asyncio.ensure_future(guarded(deadlines, 0, 5))
    await asyncio.sleep(0)  # armed, and already due
    owner.cancel()  # someone else cancels it ...
    deadlines._check()  # ... and the deadline fires before the task runs again
    outcome = await asyncio.gather(owner, return_exceptions=True)
    assert isinstance(outcome[0], asyncio.CancelledError)
    assert len(deadlines) == 0


async def test_no_tick_runs_while_nothing_is_pending() -> None:
    deadlines = Deadlines(resolution=0.01)
    assert await guarded(deadlines, 1, 0.01) == "done"
    await asyncio.sleep(0.05)  # the last tick finds nothing and does not reschedule
    assert deadlines._tick is None
