"""`tower-gateway demo`: the local tower, a demo upstream and the gateway in one process.

It uses `./gateway.yaml` when present, else the same file shipped with the
package, fills in throwaway secrets that are not set, creates a demo key and
prints the `curl` lines to try. `--self-test` runs those requests itself.

Nothing outlives the demo: its key lives in a database of its own, in a temporary
directory removed on exit (a demo that fails to start leaves nothing either), so
`serve` on the same config never trusts a demo key. Access and audit lines go to
stderr or `--log-file`, never into the banner on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import tempfile
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import aiohttp
import jwt
from aiohttp import web

from gateway.app import Gateway
from gateway.config import Config, load_config, parse_config_text
from gateway.errors import ConfigError
from gateway.http.server import GatewayRunner

DEMO_USER: Final = "demo-user"
DEMO_ROLE: Final = "operator"
DEMO_SCOPES: Final = ("tools:execute",)


def demo_config(path: str | None, scratch: Path | None = None) -> Config:
    env = dict(os.environ)
    if scratch is not None:
        # The demo's own database (see `throwaway`): never one that `serve` trusts.
        env["TOWER_GATEWAY_DB"] = str(scratch / "demo.db")
    # Throwaway secrets for this run only; a real deployment sets its own.
    env.setdefault("GATEWAY_JWT_SECRET", secrets.token_urlsafe(48))
    if not env.get("GATEWAY_ADMIN_TOKEN"):
        env["GATEWAY_ADMIN_TOKEN"] = secrets.token_urlsafe(24)
    if path is None and Path("gateway.yaml").is_file():
        path = "gateway.yaml"
    if path is not None:
        return load_config(path, env=env)
    text = resources.files("gateway").joinpath("default.yaml").read_text(encoding="utf-8")
    return parse_config_text(text, env=env, base=Path.cwd(), source="<built-in gateway.yaml>")


def _upstream_address(config: Config) -> tuple[str, int]:
    parts = urlsplit(config.routes[-1].upstream)
    return parts.hostname or "127.0.0.1", parts.port or 80


def throwaway(config: Config, scratch: Path, args: argparse.Namespace) -> Config:
    """The demo's config: its keys in `scratch`, its ports from the flags, its logs off stdout."""
    assert config.tower.local is not None
    local = replace(config.tower.local, db=str(scratch / "demo.db"), hash_secret=None)
    config = replace(config, tower=replace(config.tower, local=local))
    if args.port is not None:
        config = replace(config, server=replace(config.server, port=args.port))
    if args.ops_port is not None:
        config = replace(config, ops=replace(config.ops, port=args.ops_port))
    if args.upstream_port is not None:
        host, port = _upstream_address(config)
        old, new = f"//{host}:{port}", f"//{host}:{args.upstream_port}"
        routes = tuple(replace(r, upstream=r.upstream.replace(old, new, 1)) for r in config.routes)
        config = replace(config, routes=routes)
    target = str(Path(args.log_file).resolve()) if args.log_file else "stderr"
    log = replace(config.log, file=target, audit=target if config.log.audit is not None else None)
    return replace(config, log=log)


def create_demo_key(config: Config) -> str:
    from gateway.tower.local import resolve_hash_secret
    from gateway.tower.store import KeyStore

    assert config.tower.local is not None
    store = KeyStore(
        config.tower.local.db,
        prefix=config.tower.local.prefix,
        hash_secret=resolve_hash_secret(config.tower.local),
    )
    key, _record = store.create(
        user_id=DEMO_USER, role=DEMO_ROLE, scopes=DEMO_SCOPES, env="test", team="demo"
    )
    return key


def _banner(config: Config, key: str, admin_token: str | None) -> str:
    base = f"http://{config.server.host}:{config.server.port}"
    ops = f"http://{config.ops.host}:{config.ops.port}"
    upstream_host, upstream_port = _upstream_address(config)
    logs = config.log.file if config.log.file not in (None, "stderr") else "stderr"
    lines = [
        "tower-gateway demo is running (Ctrl-C to stop)",
        f"  gateway   {base}   (--port or GATEWAY_PORT)",
        f"  ops       {ops}   (--ops-port or GATEWAY_OPS_PORT; metrics, health, admin)",
        f"  upstream  http://{upstream_host}:{upstream_port}   (--upstream-port or DEMO_UPSTREAM)",
        "  tower     embedded, keys in a throw-away database removed on exit",
        f"  demo key  user {DEMO_USER}, role {DEMO_ROLE}, scopes {', '.join(DEMO_SCOPES)}",
        f"  logs      {logs}   (JSON access and audit lines; --log-file FILE)",
        "",
        "Try:",
        "  # 200: the upstream's echo, with the JWT it received decoded",
        f"  curl -s -H 'X-API-Key: {key}' {base}/hello",
        "  # 401: no key",
        f"  curl -s {base}/hello",
        "  # 403: an operator lacks admin:write",
        f"  curl -s -H 'X-API-Key: {key}' {base}/admin/users",
        "  # the cache hit ratio and friends",
        f"  curl -s {ops}/metrics | grep tower_gateway_cache",
    ]
    if admin_token:
        lines.append(f"  curl -s -H 'Authorization: Bearer {admin_token}' {ops}/admin/cache")
    lines += ["", "Your demo key (shown once):", key]
    return "\n".join(lines)


async def _self_test(config: Config, key: str) -> bool:
    base = f"http://{config.server.host}:{config.server.port}"
    checks = [
        ("/hello", {"X-API-Key": key}, 200),
        ("/hello", {}, 401),
        ("/admin/users", {"X-API-Key": key}, 403),
        ("/public/ping", {}, 200),
    ]
    ok = True
    async with aiohttp.ClientSession() as session:
        for path, headers, expected in checks:
            async with session.get(base + path, headers=headers) as response:
                body = await response.text()
            passed = response.status == expected
            ok = ok and passed
            print(
                f"  {'ok ' if passed else 'BAD'} GET {path} -> {response.status} "
                f"(expected {expected})"
            )
            if path == "/hello" and response.status == 200:
                seen = json.loads(body).get("jwt", {})
                print(
                    f"      upstream verified the JWT: {json.dumps(seen.get('verified'))}, "
                    f"claims: {json.dumps(seen.get('claims'))}"
                )
    return ok


async def _run(config: Config, key: str, self_test: bool) -> int:
    from gateway.cli.demo_upstream import create_demo_upstream

    gateway = Gateway(config)
    signing = gateway.signing_key

    def verify(token: str) -> dict[str, object]:
        claims: dict[str, object] = jwt.decode(
            token,
            signing.key if isinstance(signing.key, bytes) else signing.key.public_key(),
            algorithms=[signing.algorithm],
            audience=config.jwt.audience,
            issuer=config.jwt.issuer,
        )
        return claims

    runners = [
        web.AppRunner(create_demo_upstream(jwt_verify=verify), access_log=None),
        GatewayRunner(
            gateway.proxy_app(), access_log=None, shutdown_timeout=config.server.shutdown_timeout
        ),
        GatewayRunner(gateway.ops_app(), access_log=None),
    ]
    addresses = [
        _upstream_address(config),
        (config.server.host, config.server.port),
        (config.ops.host, config.ops.port),
    ]
    try:
        for runner, (host, port) in zip(runners, addresses, strict=True):
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
        if self_test:
            return 0 if await _self_test(config, key) else 1
        print(_banner(config, key, config.admin.token), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("\nstopping", flush=True)
        return 0
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def run_demo(args: argparse.Namespace) -> int:
    # Everything the demo writes (its key database and hash secret) lives here and goes
    # with it, whether it ran, failed to start or was interrupted.
    with tempfile.TemporaryDirectory(prefix="tower-gateway-demo-") as scratch:
        return _demo(args, Path(scratch))


def _demo(args: argparse.Namespace, scratch: Path) -> int:
    try:
        config = demo_config(args.config, scratch)
        if config.tower.local is None:
            raise ConfigError("tower.local", "the demo needs the embedded tower (tower.local.db)")
        config = throwaway(config, scratch, args)
        key = create_demo_key(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from gateway.runtime.serve import run

    exit_code: list[int] = []

    async def main() -> None:
        exit_code.append(await _run(config, key, args.self_test))

    try:
        run(main())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"error: cannot listen: {exc.strerror or exc} (is another demo running? "
            "--port, --ops-port and --upstream-port move the demo's ports)",
            file=sys.stderr,
        )
        return 1
    return exit_code[0] if exit_code else 1
