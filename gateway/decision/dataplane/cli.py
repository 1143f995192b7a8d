"""`tower-gateway dataplane nginx|caddy|envoy|traefik`: print a data plane's configuration."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from gateway.config import default_config_path, load_config
from gateway.decision.dataplane.common import Plan, make_plan
from gateway.errors import ConfigError

EXIT_CONFIG = 2


def _renderers() -> dict[str, Callable[[Plan], str]]:
    from gateway.decision.dataplane import caddy, envoy, nginx, traefik

    return {
        "nginx": nginx.render,
        "caddy": caddy.render,
        "envoy": envoy.render,
        "traefik": traefik.render,
    }


def cmd_dataplane(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        plan = make_plan(config, args.upstream, args.listen, workers=args.dataplane_workers)
        text = _renderers()[args.proxy](plan)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(text)
    return 0


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "dataplane",
        help="print an nginx, Caddy, Envoy or Traefik configuration for decision mode",
    )
    parser.add_argument("proxy", choices=("nginx", "caddy", "envoy", "traefik"))
    parser.add_argument("--config", default=default_config_path())
    parser.add_argument("--upstream", required=True, help="http://host:port the proxy forwards to")
    parser.add_argument("--listen", required=True, help="HOST:PORT the proxy listens on")
    parser.add_argument(
        "--workers",
        dest="dataplane_workers",
        type=int,
        default=None,
        help="nginx worker_processes (default: auto)",
    )
    parser.set_defaults(func=cmd_dataplane)
