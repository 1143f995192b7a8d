"""The `tower-gateway` command: serve, check-config, demo, keys, tower serve, explain."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from gateway import __version__
from gateway.config import Config, default_config_path, load_config, summary
from gateway.errors import ConfigError

EXIT_CONFIG = 2


class JsonFormatter(logging.Formatter):
    """Operational log lines as JSON, escaped like the access log."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=True)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log is replaced by the gateway's.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


_TOKEN = "$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"

# How to set what a config most often misses, printed after the error that names it.
HINTS: dict[str, str] = {
    "jwt.secret": (
        f'export GATEWAY_JWT_SECRET="{_TOKEN}"  (at least 32 bytes; every replica and '
        "every upstream that verifies the JWT needs the same value)"
    ),
    "tower.api_key": "export TOWER_API_KEY=... (the key your tower issued to this gateway)",
    "tower.secret": "export TOWER_SECRET=... (the secret your tower issued to this gateway)",
    "admin.token": (
        f'export GATEWAY_ADMIN_TOKEN="{_TOKEN}"  (at least 16 characters; empty turns the '
        "admin API off)"
    ),
}


def report_config_error(exc: ConfigError) -> None:
    print(f"error: {exc}", file=sys.stderr)
    hint = HINTS.get(exc.path)
    if hint is not None:
        print(f"hint: {hint}", file=sys.stderr)


def load_or_exit(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        report_config_error(exc)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_or_exit(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        from gateway.auth.tokens import load_signing_key

        load_signing_key(config.jwt)
    except ConfigError as exc:
        report_config_error(exc)
        return EXIT_CONFIG
    print(summary(config))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_or_exit(args.config)
    if config is None:
        return EXIT_CONFIG
    configure_logging(config.log.level)
    from gateway.runtime.serve import run, serve

    started = time.monotonic()
    try:
        if args.workers > 1:
            from gateway.runtime.supervisor import run_workers

            code: int = run_workers(
                config, args.config, args.workers, host=args.host, port=args.port
            )
            return code
        run(serve(config, host=args.host, port=args.port))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    logging.getLogger("tower_gateway").info("stopped after %.1fs", time.monotonic() - started)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.cli.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tower-gateway",
        description="Authenticating reverse proxy: API keys in, signed internal JWTs out.",
    )
    parser.add_argument("--version", action="version", version=f"tower-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway until SIGTERM/SIGINT")
    serve.add_argument("--config", default=default_config_path())
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("--config", default=default_config_path())
    check.set_defaults(func=cmd_check_config)

    demo = sub.add_parser("demo", help="run a local tower, a demo upstream and the gateway")
    demo.add_argument(
        "--config",
        default=None,
        help="config to use (default: ./gateway.yaml, else the built-in default)",
    )
    demo.add_argument("--port", type=int, help="the gateway's port (default: server.port)")
    demo.add_argument("--ops-port", type=int, help="the ops listener's port (default: ops.port)")
    demo.add_argument(
        "--upstream-port", type=int, help="the demo upstream's port (default: from DEMO_UPSTREAM)"
    )
    demo.add_argument(
        "--log-file",
        metavar="FILE",
        help="where access and audit lines go (default: stderr, never into the banner)",
    )
    demo.add_argument(
        "--self-test",
        action="store_true",
        help="start everything, run the printed requests, report and exit",
    )
    demo.set_defaults(func=cmd_demo)

    from gateway.cli.explain import register as register_explain
    from gateway.cli.keys import register
    from gateway.config.jsonschema import register as register_config
    from gateway.decision.dataplane.cli import register as register_dataplane

    register(sub)
    register_explain(sub)
    register_config(sub)
    register_dataplane(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "workers", 1) < 1:
        parser.error("--workers must be at least 1")
    result: int = args.func(args)
    return result
