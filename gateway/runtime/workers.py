"""`serve --workers N`: N gateway processes on one port, supervised by a parent that owns ops.

    parent (supervisor.run_workers)                    public ops listener ops.host:ops.port
      │   /metrics   every worker's exposition, each sample labelled worker="<i>"
      │   /healthz   200 while the parent serves
      │   /readyz    200 when any worker is ready
      │   /admin/*   cache, revocations and reload fanned out to every worker; audit
      │              merged newest first; config and explain from one worker; /admin/workers
      ├── worker 0   python -m gateway.cli.worker ...: proxy on server.port (SO_REUSEPORT),
      │              its own ops app on <private dir>/worker-0.sock
      └── worker 1   ...

Each worker loads the config itself. The parent restarts a worker that dies,
with an exponential back-off so a crash loop does not spin; a worker that
cannot load the config stops the whole group with exit 2. SIGTERM/SIGINT to the
parent is forwarded; workers drain in-flight requests and the parent exits 0.
SIGHUP to the parent is forwarded too: each worker reloads the config file.
Workers run in their own session so only the parent decides when they stop,
and they stop on their own when the parent disappears (their stdin closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import hdrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from yarl import URL

from gateway.config import Config
from gateway.runtime.slots import (
    WORKER_LABEL,
    Reply,
    WorkerSlot,
    backoff,
    describe_exit,
    worker_env,
)

log = logging.getLogger("tower_gateway.workers")

EXIT_CONFIG: Final = 2  # same as `tower-gateway check-config`: the config cannot be used
EXIT_LISTEN: Final = 3  # a worker could not bind its listeners
STARTUP_TIMEOUT: Final = 60.0  # every worker must answer on its ops socket within this
STABLE_AFTER: Final = 10.0  # a worker that lived this long resets the back-off
STOP_GRACE: Final = 10.0  # beyond server.shutdown_timeout before stragglers are killed
KILL_WAIT: Final = 5.0
FANOUT_TIMEOUT: Final = 5.0  # below Prometheus' default 10 s scrape timeout
# A worker whose event loop stops answering keeps receiving its share of new
# connections (SO_REUSEPORT): after this many missed health checks it is killed.
HEALTH_INTERVAL: Final = 5.0
HEALTH_FAILURES: Final = 3


# --------------------------------------------------------------------------- the group


class WorkerGroup:
    """Starts, watches, restarts and stops the worker processes; talks to their ops sockets."""

    def __init__(
        self,
        config: Config,
        config_path: str,
        workers: int,
        *,
        socket_dir: str,
        host: str | None = None,
        port: int | None = None,
        health_interval: float = HEALTH_INTERVAL,
        health_failures: int = HEALTH_FAILURES,
    ) -> None:
        if workers < 1:
            raise ValueError("a worker group needs at least one worker")
        self.config = config
        self.health_interval = health_interval
        self.health_failures = health_failures
        self.config_path = str(Path(config_path).resolve())
        self.host = host
        self.port = port
        self.slots = [
            WorkerSlot(i, os.path.join(socket_dir, f"worker-{i}.sock")) for i in range(workers)
        ]
        self.stopping = False
        self._started = False
        self._wake = asyncio.Event()  # interrupts back-off sleeps when the group stops
        self._fatal: asyncio.Future[int] | None = None
        self._env = worker_env()

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event, force: asyncio.Event) -> int:
        """Run until `stop` is set or a worker fails fatally; returns the exit code."""
        self._fatal = asyncio.get_running_loop().create_future()
        for slot in self.slots:
            # force_close: a restarted worker is a new process behind the same
            # path, so a pooled connection would point at a dead one.
            slot.session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(slot.socket_path, force_close=True),
                timeout=aiohttp.ClientTimeout(total=FANOUT_TIMEOUT),
            )
        supervisors = [asyncio.create_task(self._supervise(slot)) for slot in self.slots]
        code = 1
        try:
            code = await self._start(stop)
            if code == 0 and not stop.is_set():
                self._started = True
                log.info(
                    "%d workers ready (pids %s)",
                    len(self.slots),
                    ", ".join(str(s.describe()["pid"]) for s in self.slots),
                )
                code = await self._first(stop.wait(), self._fatal)
        finally:
            clean = await self._stop_workers(supervisors, force)
            for slot in self.slots:
                if slot.session is not None:
                    await slot.session.close()
        return code if code != 0 or clean else 1

    async def _start(self, stop: asyncio.Event) -> int:
        assert self._fatal is not None

        async def all_ready() -> None:
            for slot in self.slots:
                await slot.ready.wait()

        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                await self._first(all_ready(), stop.wait(), self._fatal)
        except TimeoutError:
            log.error("workers did not become ready within %.0fs", STARTUP_TIMEOUT)
            return 1
        return self._fatal.result() if self._fatal.done() else 0

    @staticmethod
    async def _first(*awaitables: Any) -> int:
        """Wait for the first awaitable; an int result is an exit code, anything else 0."""
        tasks = [asyncio.ensure_future(a) for a in awaitables]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                if isinstance(task, asyncio.Task):
                    task.cancel()
        result = next(iter(done)).result()
        return result if isinstance(result, int) and not isinstance(result, bool) else 0

    def _fail(self, code: int) -> None:
        if self._fatal is not None and not self._fatal.done():
            self._fatal.set_result(code)

    async def _supervise(self, slot: WorkerSlot) -> None:
        try:
            await self._keep_running(slot)
        except Exception:
            # An unsupervised slot would silently shrink the group: stop it instead.
            log.exception("supervisor of worker %d failed; stopping all workers", slot.index)
            self._fail(1)

    async def _keep_running(self, slot: WorkerSlot) -> None:
        while not self.stopping:
            try:
                process = await self._spawn(slot)
            except OSError as exc:
                log.error("cannot start worker %d: %s", slot.index, exc)
                self._fail(1)
                return
            watch = asyncio.create_task(self._watch(slot, process))
            code = await process.wait()
            watch.cancel()
            if process.stdin is not None:
                process.stdin.close()
            slot.ready.clear()
            slot.last_exit = code
            lived = time.monotonic() - slot.started_at
            if self.stopping:
                return
            if code == EXIT_CONFIG:
                log.error("worker %d cannot use the config; stopping all workers", slot.index)
                self._fail(EXIT_CONFIG)
                return
            if not self._started:
                log.error(
                    "worker %d (pid %d) exited with %s while starting; stopping",
                    slot.index,
                    process.pid,
                    describe_exit(code),
                )
                self._fail(1)
                return
            slot.quick_exits = 0 if lived >= STABLE_AFTER else slot.quick_exits + 1
            delay = backoff(slot.quick_exits)
            log.warning(
                "worker %d (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                slot.index,
                process.pid,
                describe_exit(code),
                lived,
                delay,
            )
            slot.restarts += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _spawn(self, slot: WorkerSlot) -> asyncio.subprocess.Process:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot.socket_path)
        argv = [
            sys.executable,
            "-m",
            "gateway.cli.worker",
            "--config",
            self.config_path,
            "--index",
            str(slot.index),
            "--ops-socket",
            slot.socket_path,
        ]
        if self.host is not None:
            argv += ["--host", self.host]
        if self.port is not None:
            argv += ["--port", str(self.port)]
        process = await asyncio.create_subprocess_exec(
            *argv,
            # The worker never reads stdin: its closing tells the worker the parent is gone.
            stdin=asyncio.subprocess.PIPE,
            env=self._env,
            # Own session: a terminal's Ctrl-C reaches only the parent, which
            # forwards one SIGTERM; a second signal would cut a worker's drain short.
            start_new_session=True,
        )
        slot.process, slot.started_at = process, time.monotonic()
        if self.stopping:  # the stop began while this worker was being started
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        return process

    async def _watch(self, slot: WorkerSlot, process: asyncio.subprocess.Process) -> None:
        """Set `slot.ready` once the worker answers on its ops socket; kill it if it stops.

        The proxy listener is bound before the ops socket, so an answer means it serves.
        """
        pause = 0.02
        while not slot.ready.is_set():
            if process.returncode is not None:
                return
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                status, _ = await self.call(slot, hdrs.METH_GET, "/healthz", within=1.0)
                if status == 200:
                    slot.ready.set()
                    log.info("worker %d ready (pid %d)", slot.index, process.pid)
                    break
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)
        missed = 0
        while process.returncode is None and not self.stopping:
            await asyncio.sleep(self.health_interval)
            try:
                status, _ = await self.call(
                    slot, hdrs.METH_GET, "/healthz", within=self.health_interval
                )
            except (aiohttp.ClientError, TimeoutError, OSError):
                status = 0
            missed = 0 if status == 200 else missed + 1
            if missed >= self.health_failures and not self.stopping:
                log.error(
                    "worker %d (pid %d) missed %d health checks; killing it",
                    slot.index,
                    process.pid,
                    missed,
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                return

    async def _stop_workers(
        self, supervisors: list[asyncio.Task[None]], force: asyncio.Event
    ) -> bool:
        """Forward SIGTERM, wait for the drain, kill what outlives it; True when none was killed."""
        self.stopping = True
        self._wake.set()
        for slot in self.slots:
            self._signal(slot, signal.SIGTERM)
        bound = self.config.server.shutdown_timeout + STOP_GRACE

        async def all_exited() -> None:
            await asyncio.wait(supervisors)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound):
                await self._first(all_exited(), force.wait())
        clean = all(task.done() for task in supervisors)
        if not clean:
            if force.is_set():
                log.warning("killing the workers that are still draining")
            else:
                log.error("workers still running %.0fs after SIGTERM; killing them", bound)
            for slot in self.slots:
                self._signal(slot, signal.SIGKILL)
            await asyncio.wait(supervisors, timeout=KILL_WAIT)
            for task in supervisors:
                task.cancel()
        return clean

    def forward_signal(self, signum: int) -> int:
        """Send `signum` to every ready worker (one still starting has no handler yet
        and reads the current config anyway); returns how many got it."""
        ready = [slot for slot in self.slots if slot.ready.is_set()]
        for slot in ready:
            self._signal(slot, signum)
        return len(ready)

    @staticmethod
    def _signal(slot: WorkerSlot, signum: int) -> None:
        if slot.alive and slot.process is not None:
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(signum)

    # ------------------------------------------------------------------ talking to workers

    async def call(
        self,
        slot: WorkerSlot,
        method: str,
        path: str,
        *,
        within: float = FANOUT_TIMEOUT,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """One request to a worker's private ops app; `path` is URL-encoded, query included."""
        if slot.session is None:
            raise aiohttp.ClientConnectionError("worker group is not running")
        sent = dict(headers or {})
        token = self.config.admin.token
        if path.startswith("/admin/") and token is not None:
            sent[hdrs.AUTHORIZATION] = f"Bearer {token}"
        route, _, query = path.partition("?")
        url = URL.build(scheme="http", host="worker", path=route, query_string=query, encoded=True)
        async with asyncio.timeout(within):
            async with slot.session.request(method, url, data=body, headers=sent) as response:
                return response.status, await response.read()

    async def fan_out(
        self,
        method: str,
        path: str,
        *,
        every: bool,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[Reply]:
        """Ask workers in parallel.

        every=False: only workers already known to be ready (a scrape must not
        wait). every=True: every running worker, waiting briefly for one still
        starting, because an admin action must reach all of them. A slot with no
        process is skipped either way: its next process starts with an empty cache.
        """
        targets = [s for s in self.slots if (s.alive if every else s.ready.is_set())]

        async def one(slot: WorkerSlot) -> Reply:
            try:
                async with asyncio.timeout(FANOUT_TIMEOUT):
                    await slot.ready.wait()
                    status, answer = await self.call(slot, method, path, body=body, headers=headers)
                return Reply(slot.index, status, answer)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return Reply(slot.index, 0, error=type(exc).__name__)

        return list(await asyncio.gather(*(one(slot) for slot in targets)))

    def own_metrics(self, up: Mapping[int, bool]) -> list[Metric]:
        """The parent's view of its workers, written next to theirs."""
        worker_up = GaugeMetricFamily(
            "tower_gateway_worker_up",
            "1 when the worker answered this scrape",
            labels=[WORKER_LABEL],
        )
        restarts = CounterMetricFamily(
            "tower_gateway_worker_restarts",
            "Worker processes restarted after an exit",
            labels=[WORKER_LABEL],
        )
        for slot in self.slots:
            worker_up.add_metric([str(slot.index)], 1.0 if up.get(slot.index) else 0.0)
            restarts.add_metric([str(slot.index)], slot.restarts)
        return [worker_up, restarts]
