"""Latency of known keys under a hanging tower, and tower calls for a busy key.

Everything on 127.0.0.1, bounded in requests and time. A fake tower and upstream run in
this process; the gateway under test runs as `python -m gateway serve` from `--tree` (a
source tree: this one by default, or an export of another commit to compare with).

Phase 1 (hang): `--keys` keys are validated, then the tower stops answering (it holds
every call until the gateway gives up) and `--concurrency` clients send requests with
those keys for `--seconds`, `cache.ttl` being `--ttl`. Reported: latency percentiles,
requests over 1 s, and the requests that waited for a tower call, read from the gateway
(`tower_waits` in `GET /admin/cache`, or `misses` for a tree without it: there every miss
waits). That count does not depend on how loaded the machine is; the latencies do.

Phase 2 (busy key): the tower answers again; one key is sent for `--busy-seconds` at a
steady pace and the tower's calls for it are counted.

    python bench/slow_tower.py [--tree DIR] [--seconds 20] [--ttl 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Tower:
    def __init__(self) -> None:
        self.answering = asyncio.Event()
        self.answering.set()
        self.calls: dict[str, int] = {}

    async def validate(self, request: web.Request) -> web.Response:
        key = (await request.json())["api_key"]
        self.calls[key] = self.calls.get(key, 0) + 1
        await self.answering.wait()  # while hanging: until the gateway gives up on the call
        if not key.startswith("k-"):
            return web.json_response({"valid": False, "reason": "invalid"}, status=401)
        return web.json_response(
            {"valid": True, "key_id": key, "user_id": "u-" + key, "role": "operator"}
        )


async def upstream(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def start(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    return runner


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


@dataclass
class Stack:
    """The fake tower and upstream in this process, the gateway as a child process."""

    tower: Tower
    base: str  # the proxy listener's URL
    ops: str  # the ops listener's URL
    admin: str  # the admin token


@contextlib.asynccontextmanager
async def stack(tree: str, cache: dict[str, Any], **sections: Any) -> AsyncIterator[Stack]:
    tower = Tower()
    tower_app = web.Application()
    tower_app.router.add_post("/api/v1/validate", tower.validate)
    up_app = web.Application()
    up_app.router.add_route("*", "/{tail:.*}", upstream)
    tower_port, up_port, port, ops_port = (free_port() for _ in range(4))
    runners = [await start(tower_app, tower_port), await start(up_app, up_port)]
    admin = "bench-admin-" + secrets.token_hex(8)
    config = {
        "server": {"host": HOST, "port": port},
        "ops": {"host": HOST, "port": ops_port},
        "tower": {"url": f"http://{HOST}:{tower_port}", "timeout": 2.0},
        "cache": {"stale_if_error": 300, **cache},
        "routes": [{"path": "/", "upstream": f"http://{HOST}:{up_port}"}],
        "rate_limit": {"default_per_minute": 0},
        "credentials": {"failed_auth_per_minute": 0},
        "log": {"access": False, "audit": None, "level": "ERROR"},
    }
    for name, section in sections.items():  # a callable gets the upstream's URL
        value = section(f"http://{HOST}:{up_port}") if callable(section) else section
        old = config.get(name)
        config[name] = {**old, **value} if isinstance(old, dict) else value
    env = {
        **os.environ,
        "PYTHONPATH": tree,
        "TOWER_API_KEY": "bench-tower-" + secrets.token_hex(8),
        "TOWER_SECRET": "bench-secret-" + secrets.token_hex(8),
        "GATEWAY_JWT_SECRET": secrets.token_hex(32),
        "GATEWAY_ADMIN_TOKEN": admin,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gateway.json"  # JSON is YAML
        path.write_text(json.dumps(config))
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, cwd=tmp)
        try:
            ops = f"http://{HOST}:{ops_port}"
            async with aiohttp.ClientSession() as http:
                for _ in range(200):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"{ops}/healthz") as r:
                            if r.status == 200:
                                break
                    await asyncio.sleep(0.05)
            yield Stack(tower, f"http://{HOST}:{port}", ops, admin)
        finally:
            proc.terminate()
            await proc.wait()
            for runner in runners:
                await runner.cleanup()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with stack(args.tree, {"ttl": args.ttl}, tower={"timeout": args.tower_timeout}) as s:
        return await measure(args, s)


async def measure(args: argparse.Namespace, s: Stack) -> dict[str, Any]:
    tower, base, ops = s.tower, f"{s.base}/x", f"{s.ops}/admin/cache"
    keys = [f"k-{i}" for i in range(args.keys)]
    async with aiohttp.ClientSession() as http:
        for key in keys:
            async with http.get(base, headers={"X-API-Key": key}) as r:
                assert r.status == 200, r.status

        async def stats() -> dict[str, Any]:
            async with http.get(ops, headers={"Authorization": f"Bearer {s.admin}"}) as r:
                return dict(await r.json())

        before = await stats()
        tower.answering.clear()
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        deadline = time.monotonic() + args.seconds

        async def client() -> None:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                async with http.get(base, headers={"X-API-Key": random.choice(keys)}) as r:
                    await r.read()
                latencies.append(time.perf_counter() - started)
                statuses[r.status] = statuses.get(r.status, 0) + 1
                await asyncio.sleep(args.pause)

        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        after = await stats()
        counter = "tower_waits" if "tower_waits" in after else "misses"
        tower.answering.set()

        # Busy key: a steady pace over several TTLs, with a working tower (once the breaker
        # the hang opened lets a new key through again).
        busy = "k-busy"
        for _ in range(100):
            async with http.get(base, headers={"X-API-Key": busy}) as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.1)
        tower.calls[busy] = 1
        end = time.monotonic() + args.busy_seconds
        while time.monotonic() < end:
            async with http.get(base, headers={"X-API-Key": busy}) as r:
                await r.read()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
    ms = [v * 1000 for v in latencies]
    return {
        "tree": args.tree,
        "hang": {
            "seconds": args.seconds,
            "ttl": args.ttl,
            "keys": args.keys,
            "requests": len(ms),
            "statuses": statuses,
            "p50_ms": round(percentile(ms, 50), 1),
            "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(max(ms), 1),
            "over_1s": sum(1 for v in ms if v > 1000),
            "waited_for_tower": after[counter] - before[counter],
            "counted_by": counter,
        },
        "busy_key": {
            "seconds": args.busy_seconds,
            "ttl": args.ttl,
            "tower_calls": tower.calls.get(busy, 0),
        },
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", default=str(ROOT), help="source tree of the gateway under test")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--busy-seconds", type=float, default=15.0)
    p.add_argument("--ttl", type=float, default=3.0)
    p.add_argument("--keys", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--pause", type=float, default=0.01, help="per client, between requests")
    p.add_argument("--tower-timeout", type=float, default=2.0)
    args = p.parse_args()
    args.tree = str(Path(args.tree).resolve())
    return args


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse_args())), indent=2))
