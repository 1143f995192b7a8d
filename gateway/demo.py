"""`tower-gateway demo`: the local tower, a demo upstream and the gateway in one process.

It uses `./gateway.yaml` when present, else the same file shipped with the
package, fills in throwaway secrets that are not set, creates a demo key and
prints the `curl` lines to try. `--self-test` runs those requests itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
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
from gateway.httpserver import GatewayRunner

DEMO_USER: Final = "demo-user"
DEMO_ROLE: Final = "operator"
DEMO_SCOPES: Final = ("tools:execute",)


def demo_config(path: str | None) -> Config:
    env = dict(os.environ)
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


def create_demo_key(config: Config) -> str:
    from gateway.tower.local import KeyStore, resolve_hash_secret

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
    lines = [
        "tower-gateway demo is running (Ctrl-C to stop)",
        f"  gateway   {base}",
        f"  ops       {ops}   (metrics, health, admin)",
        f"  tower     embedded, keys in {config.tower.local.db if config.tower.local else '-'}",
        f"  demo key  user {DEMO_USER}, role {DEMO_ROLE}, scopes {', '.join(DEMO_SCOPES)}",
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
    from gateway.demo_upstream import create_demo_upstream

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
    try:
        config = demo_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.tower.local is None:
        print(
            "error: tower.local: the demo needs the embedded tower (tower.local.db)",
            file=sys.stderr,
        )
        return 2
    key = create_demo_key(config)
    from gateway.serve import run

    result = 1
    exit_code: list[int] = []

    async def main() -> None:
        exit_code.append(await _run(config, key, args.self_test))

    try:
        run(main())
        result = exit_code[0] if exit_code else 1
    except OSError as exc:
        print(
            f"error: cannot listen: {exc.strerror or exc} (is another demo running?)",
            file=sys.stderr,
        )
        return 1
    return result
