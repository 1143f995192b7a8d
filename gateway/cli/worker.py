"""One worker of `serve --workers N`, started by the parent as `python -m gateway.cli.worker`:
`serve(reuse_port=True, ops=False)` plus its private ops socket, stopping with its parent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
from collections.abc import Sequence

from gateway.cli.main import configure_logging, load_or_exit
from gateway.errors import ConfigError
from gateway.runtime.serve import run, serve
from gateway.runtime.slots import WORKER_LABEL
from gateway.runtime.workers import EXIT_CONFIG, EXIT_LISTEN


class _WorkerFormatter(logging.Formatter):
    """The operational JSON log line, plus which worker wrote it."""

    def __init__(self, inner: logging.Formatter, index: int) -> None:
        super().__init__()
        self._inner = inner
        self._index = index

    def format(self, record: logging.LogRecord) -> str:
        line = self._inner.format(record)
        try:
            data = json.loads(line)
        except ValueError:
            return line
        data[WORKER_LABEL] = self._index
        return json.dumps(data, ensure_ascii=True)


def _exit_with_parent() -> None:
    """Stop gracefully when the parent goes away: its end of our stdin pipe closes."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return
    # A pipe (asyncio) or a socketpair (uvloop/libuv); anything else means the
    # worker was started by hand and has no parent to follow.
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return

    def watch() -> None:
        # os.read, not sys.stdin: a daemon thread blocked inside a buffered
        # reader holds its lock and aborts the interpreter at exit.
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _bind_unix(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def worker_main(argv: Sequence[str] | None = None) -> int:
    """One worker: `serve(reuse_port=True, ops=False)` plus the private ops socket."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway.cli.worker",
        description="One worker of `tower-gateway serve --workers N` (started by the parent).",
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--ops-socket", required=True)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)

    config = load_or_exit(args.config)
    if config is None:
        return EXIT_CONFIG
    configure_logging(config.log.level)
    for handler in logging.getLogger().handlers:
        if handler.formatter is not None:
            handler.setFormatter(_WorkerFormatter(handler.formatter, args.index))
    _exit_with_parent()
    try:
        ops_sock = _bind_unix(args.ops_socket)
        run(
            serve(
                config,
                host=args.host,
                port=args.port,
                reuse_port=True,
                ops=False,
                ops_sock=ops_sock,
            )
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"error: worker {args.index} cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_LISTEN
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
