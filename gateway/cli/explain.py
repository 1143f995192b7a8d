"""`tower-gateway explain`: ask a running gateway why it allows or denies a request.

    tower-gateway explain [--config FILE] (--key K | --key - | --fingerprint F)
                          [--method M] --path P [--ops URL] [--admin-token T] [--json]

It calls `POST {ops}/admin/explain` (the key travels in the body, never in a URL)
and prints a readable report. The ops URL and the admin token come from the
flags, else `$GATEWAY_ADMIN_TOKEN` and the config file; with both flags (or the
variable) no config is read. `--key -` reads the key from stdin, which keeps it
out of the shell history and the process list. Exit status: 0 allowed, 1 denied
(also `would_deny` on a shadow route: the policy says no), 2 no answer.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import sys
from typing import Any, Final

import httpx

from gateway.config import default_config_path, load_config
from gateway.errors import ConfigError

EXIT_ALLOW: Final = 0
EXIT_DENY: Final = 1
EXIT_ERROR: Final = 2
TIMEOUT: Final = 10.0
TOKEN_ENV: Final = "GATEWAY_ADMIN_TOKEN"


def ops_url(host: str, port: int) -> str:
    """The URL a local client reaches an ops listener bound to `host` at."""
    if host in ("0.0.0.0", ""):  # a wildcard bind address: reach it on loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    return f"http://{host}:{port}"


def _endpoint(args: argparse.Namespace) -> tuple[str, str | None]:
    """(ops URL, admin token), reading the config only for what the flags leave open."""
    url: str | None = args.ops
    token: str | None = args.admin_token or os.environ.get(TOKEN_ENV) or None
    if url is None or token is None:
        config = load_config(args.config or default_config_path())
        url = url or ops_url(config.ops.host, config.ops.port)
        token = token or config.admin.token
    return url.rstrip("/"), token


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def report(answer: dict[str, Any]) -> str:
    """The explain answer as a few aligned lines for a terminal."""
    decision = answer.get("decision", "?")
    headline = {"allow": "ALLOW", "deny": "DENY", "would_deny": "WOULD DENY"}.get(decision, "?")
    lines = [
        f"{headline}  {answer.get('method')} {answer.get('path')}  -> "
        f"{answer.get('status')} {answer.get('reason')}",
        f"  {answer.get('detail')}",
    ]
    if decision == "would_deny":
        lines.append("  shadow mode (enforce: false): forwarded anyway, and counted as would_deny")

    def row(name: str, value: object) -> None:
        lines.append(f"{name:<13}{value}")

    route = answer.get("route")
    if route:
        require = ", ".join(route["require"]) or "nothing"
        row(
            "route",
            f"{route['name']}  (prefix {route['path']}, require {require}, "
            f"auth {str(route['auth']).lower()}, enforce {str(route['enforce']).lower()}, "
            f"upstream {route['upstream']})",
        )
    else:
        row("route", "none")
    if answer.get("key"):
        source = f" (from {answer['source']})" if answer.get("source") else ""
        row("key", f"{answer['key']}{source}")
    identity = answer.get("identity")
    if identity:
        row(
            "identity",
            f"user {identity['user_id']}, key_id {identity['key_id']}, "
            f"tower role {identity['role']} -> role {answer.get('role')}",
        )
        if identity.get("team"):
            row("team", identity["team"])
        row("scopes", ", ".join(identity["scopes"]) or "none")
        row("expires", _when(identity.get("expires_at")))
    mode = answer.get("decision_mode")
    if mode:
        row("decision", f"{mode['status']} on {mode['listener']}, {mode['cache_control']}")
    if answer.get("capabilities") is not None:
        row("capabilities", ", ".join(answer["capabilities"]) or "none")
    if answer.get("missing_capability"):
        row("missing", answer["missing_capability"])
    if identity:
        limit = answer.get("rate_limit_per_minute")
        row("rate limit", f"{limit:g}/min (not evaluated)" if limit else "none")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    key: str | None = args.key
    if key == "-":
        key = sys.stdin.readline().strip()
        if not key:
            print("error: no key on stdin", file=sys.stderr)
            return EXIT_ERROR
    try:
        url, token = _endpoint(args)
    except ConfigError as exc:
        print(f"error: {exc} (or give --ops and --admin-token)", file=sys.stderr)
        return EXIT_ERROR
    if token is None:
        print(f"error: no admin token: --admin-token, ${TOKEN_ENV} or admin.token", file=sys.stderr)
        return EXIT_ERROR
    body: dict[str, str] = {"method": args.method.upper(), "path": args.path}
    if key is not None:
        body["key"] = key
    else:
        body["fingerprint"] = args.fingerprint
    try:
        response = httpx.post(
            f"{url}/admin/explain",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=TIMEOUT,
        )
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the ops listener at {url}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code != 200 or not isinstance(answer, dict):
        detail = answer.get("detail") if isinstance(answer, dict) else response.text[:200]
        print(f"error: {url} answered {response.status_code}: {detail}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(answer, indent=2) if args.json else report(answer))
    return EXIT_ALLOW if answer.get("decision") == "allow" else EXIT_DENY


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `explain` to a command line."""
    explain = subparsers.add_parser(
        "explain",
        help="ask the running gateway why it allows or denies a request",
        description="Exit 0 when allowed, 1 when denied, 2 when there is no answer.",
    )
    explain.add_argument("--config", default=None, help="for the ops URL and the admin token")
    who = explain.add_mutually_exclusive_group(required=True)
    who.add_argument("--key", metavar="K", help="the API key, or - to read it from stdin")
    who.add_argument(
        "--fingerprint", metavar="F", help="a key fingerprint from the access or audit log"
    )
    explain.add_argument("--method", default="GET", metavar="M")
    explain.add_argument("--path", required=True, metavar="P")
    explain.add_argument("--ops", default=None, metavar="URL", help="e.g. http://127.0.0.1:9091")
    explain.add_argument(
        "--admin-token", default=None, metavar="T", help=f"default: ${TOKEN_ENV}, admin.token"
    )
    explain.add_argument("--json", action="store_true", help="print the raw JSON answer")
    explain.set_defaults(func=run)
