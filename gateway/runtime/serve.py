"""Run a gateway: the proxy and ops listeners, signals, and a bounded graceful drain.

SIGTERM/SIGINT stop it; SIGHUP reloads the config file (`gateway.ops.reload`) and
reopens the log files.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from gateway.app import Gateway
from gateway.config import Config
from gateway.http.server import GatewayRunner
from gateway.ops.reload import shadow_routes

log = logging.getLogger("tower_gateway.serve")


async def serve(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    reuse_port: bool = False,
    ops: bool = True,
    sock: socket.socket | None = None,
    on_ready: Callable[[Gateway], None] | None = None,
    ops_sock: socket.socket | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and drain in-flight requests.

    `ops_sock`, when given, is a bound listening socket that serves the ops app
    as well (a worker's private listener, scraped by its supervisor).
    """
    gateway = Gateway(config)
    proxy_runner = GatewayRunner(
        gateway.proxy_app(),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=config.server.shutdown_timeout,
    )
    await proxy_runner.setup()
    ops_runner = GatewayRunner(gateway.ops_app(), access_log=None, handle_signals=False)
    await ops_runner.setup()
    decision_runner: GatewayRunner | None = None
    try:
        decision_runner = await _decision_runner(gateway)
        site: web.BaseSite | None = None
        if not config.server.enabled:
            pass  # decision only: the proxy app still runs the gateway's lifespan
        elif sock is not None:
            site = web.SockSite(proxy_runner, sock)
        else:
            site = web.TCPSite(
                proxy_runner,
                host or config.server.host,
                port if port is not None else config.server.port,
                reuse_port=reuse_port or None,
                backlog=1024,
            )
        if site is not None:
            await site.start()
        if decision_runner is not None and config.decision is not None:
            decision_site = web.TCPSite(
                decision_runner,
                config.decision.host,
                config.decision.port,
                reuse_port=reuse_port or None,
                backlog=1024,
            )
            await decision_site.start()
            log.info("decision listener on %s", decision_site.name)
        if ops:
            await web.TCPSite(
                ops_runner, config.ops.host, config.ops.port, reuse_port=reuse_port or None
            ).start()
        if ops_sock is not None:
            await web.SockSite(ops_runner, ops_sock).start()
        ops_at = (
            f"{config.ops.host}:{config.ops.port}"
            if ops
            else "on a private socket"
            if ops_sock is not None
            else "off"
        )
        log.info(
            "listening on %s (ops %s)", site.name if site else "nothing (decision only)", ops_at
        )
        if shadow_routes(config):
            log.warning(
                "routes in shadow mode (enforce: false), denials are logged, not enforced: %s",
                ", ".join(shadow_routes(config)),
            )
        if on_ready is not None:
            on_ready(gateway)
        await _wait_for_signal(lambda: gateway.reloader.reload(trigger="sighup"))
        log.info(
            "stopping: draining in-flight requests (up to %ss)", config.server.shutdown_timeout
        )
    finally:
        # cleanup() stops accepting first, waits for in-flight handlers up to
        # shutdown_timeout, then closes the gateway's clients (cleanup_ctx).
        if decision_runner is not None:
            await decision_runner.cleanup()
        await proxy_runner.cleanup()
        await ops_runner.cleanup()


async def _decision_runner(gateway: Gateway) -> GatewayRunner | None:
    """The decision listener's runner (`decision:`), set up; None when there is none."""
    if gateway.config.decision is None:
        return None
    from gateway.decision.listener import decision_app

    runner = GatewayRunner(
        decision_app(gateway),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=gateway.config.server.shutdown_timeout,
    )
    await runner.setup()
    return runner


async def _wait_for_signal(on_hangup: Callable[[], object] | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_hangup is not None:
        # The reload is synchronous and runs between two callbacks of the loop.
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await stop.wait()
    finally:
        # SIGHUP stays handled through the drain (a logrotate HUP must not kill it); the
        # loop drops the handler when it closes.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a default dependency
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)
