"""The parent of `serve --workers N`: starts the group, its public ops listener, and signals.

See `gateway.runtime.workers` for the group itself and `gateway.cli.worker` for one worker.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import socket
import sys
import tempfile

from aiohttp import web

from gateway.config import Config
from gateway.http.server import GatewayRunner
from gateway.runtime.group_ops import create_group_ops_app
from gateway.runtime.serve import run
from gateway.runtime.workers import WorkerGroup

log = logging.getLogger("tower_gateway.workers")


def run_workers(
    config: Config,
    config_path: str,
    workers: int,
    *,
    host: str | None = None,
    port: int | None = None,
) -> int:
    """Run the supervised group until SIGTERM/SIGINT; returns the process exit code."""
    if not (hasattr(socket, "SO_REUSEPORT") and hasattr(socket, "AF_UNIX")):
        print(
            "error: --workers needs SO_REUSEPORT and unix sockets (Linux, BSD, macOS)",
            file=sys.stderr,
        )
        return 1
    if config.rate_limit.backend == "memory" and config.rate_limit.default_per_minute > 0:
        log.warning(
            "rate_limit.backend is memory: each of the %d workers counts on its own, "
            "so a key may get up to %d times its limit; use backend: redis",
            workers,
            workers,
        )
    try:
        # 0700 directory: only this user can reach the workers' ops sockets.
        socket_dir = tempfile.mkdtemp(prefix="tower-gateway-")
    except OSError as exc:
        print(f"error: --workers needs a writable TMPDIR for its sockets: {exc}", file=sys.stderr)
        return 1
    outcome: list[int] = []

    async def main() -> None:
        group = WorkerGroup(
            config, config_path, workers, socket_dir=socket_dir, host=host, port=port
        )
        outcome.append(await _run_group(group))

    try:
        run(main())
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
    return outcome[0] if outcome else 1


async def _run_group(group: WorkerGroup) -> int:
    config = group.config
    runner = GatewayRunner(create_group_ops_app(group), access_log=None, handle_signals=False)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: not waiting for the drain", signal.Signals(signum).name)
            force.set()
            return
        log.info("%s: stopping the workers", signal.Signals(signum).name)
        stop.set()

    try:
        # Bound before any worker starts, so a taken ops port fails fast.
        await web.TCPSite(runner, config.ops.host, config.ops.port).start()
        log.info(
            "supervising %d workers (ops %s:%s)", len(group.slots), config.ops.host, config.ops.port
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        # Each worker reloads the config file itself; the supervisor's own settings
        # (the ops listener, the admin token) are restart-only anyway.
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: log.info("SIGHUP: reloading %d workers", group.forward_signal(signal.SIGHUP)),
        )
        code = await group.run(stop, force)
        log.info("all workers stopped (exit %d)", code)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
    return code
