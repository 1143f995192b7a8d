"""What the rate limiter costs per decision, in process: the memory limiter, the Redis limiter in
exact mode and in batched mode, against a real redis-server on 127.0.0.1.

CPU time, not wall-clock, so a busy machine moves the figures little: this process's
`time.process_time()` per decision (the limiter and redis-py's client work), redis-server's
own CPU per decision (from its `INFO cpu`), and Redis round trips per decision. Each mode
makes the same bounded number of decisions from `--concurrency` tasks over 100 buckets, with
a limit no bucket reaches, after a warm-up. The best of `--rounds` rounds is reported.

    python bench/limiter.py                          # 64 concurrent, then 1, both parsers
    python bench/limiter.py --decisions 20000 --concurrency 64 --parser python
    python bench/limiter.py --json out.json

`--parser python` forces redis-py's pure-Python reply parser; `hiredis` (the default when
the `hiredis` package is installed) its C parser. redis-server comes from PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis.asyncio  # noqa: E402
from gateway.auth.ratelimit import MemoryRateLimiter  # noqa: E402
from gateway.auth.ratelimit_batched import BatchedRateLimiter  # noqa: E402
from gateway.auth.ratelimit_exact import RedisRateLimiter  # noqa: E402
from gateway.replicas.pool import WaitingPool  # noqa: E402
from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser  # noqa: E402

BUCKETS = [f"fp-{i:03d}" for i in range(100)]
PER_MINUTE = 1_000_000.0
PREFIX = "bench-limiter:"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", directory]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


async def redis_cpu(client: redis.asyncio.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def drive(hit: Callable[[str], Awaitable[Any]], decisions: int, concurrency: int) -> None:
    per_task = decisions // concurrency

    async def one(offset: int) -> None:
        for i in range(per_task):
            await hit(BUCKETS[(offset + i) % len(BUCKETS)])
            # As between requests: the other tasks (and the batched settle) get their turn.
            await asyncio.sleep(0)

    await asyncio.gather(*(one(k) for k in range(concurrency)))


async def measure(
    mode: str, url: str, parser: str, decisions: int, concurrency: int
) -> dict[str, float]:
    parser_class = _AsyncRESP2Parser if parser == "python" else _AsyncHiredisParser
    pool = WaitingPool.from_url(url, max_connections=100, timeout=5.0, parser_class=parser_class)
    client = redis.asyncio.Redis.from_pool(pool)
    probe = redis.asyncio.Redis.from_url(url)
    trips = 0
    limiter: Any
    if mode == "memory":
        limiter = MemoryRateLimiter()
    elif mode == "exact":
        limiter = RedisRateLimiter(client, prefix=PREFIX, fallback=MemoryRateLimiter(), timeout=5.0)
    else:
        limiter = BatchedRateLimiter(client, prefix=PREFIX, sync_interval=0.1, timeout=5.0)

    async def hit(bucket: str) -> Any:
        return await limiter.hit(bucket, PER_MINUTE)

    try:
        await drive(hit, min(decisions, 2000), concurrency)  # warm: script loaded, pool filled
        trips_before = getattr(limiter, "round_trips", 0) + getattr(limiter, "settles", 0)
        redis_before = await redis_cpu(probe)
        cpu, wall = time.process_time(), time.perf_counter()
        await drive(hit, decisions, concurrency)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        trips = getattr(limiter, "round_trips", 0) + getattr(limiter, "settles", 0) - trips_before
        redis_used = await redis_cpu(probe) - redis_before
    finally:
        await limiter.close()
        await client.aclose()
        await probe.aclose()
    made = decisions // concurrency * concurrency
    return {
        "cpu_us": cpu / made * 1e6,
        "redis_cpu_us": redis_used / made * 1e6,
        "round_trips_per_decision": trips / made,
        "wall_us": wall / made * 1e6,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, action="append")
    parser.add_argument("--parser", choices=("python", "hiredis"), action="append")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    concurrencies = args.concurrency or [64, 1]
    parsers = args.parser or ["hiredis", "python"]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-limiter-") as directory:
        proc, port = start_redis(directory)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            print(
                f"{'mode':8} {'parser':8} {'conc':>5} {'cpu µs':>8} {'redis µs':>9} "
                f"{'trips/dec':>9} {'wall µs':>8}"
            )
            for concurrency in concurrencies:
                for mode in ("memory", "exact", "batched"):
                    for parser_name in parsers if mode != "memory" else ["-"]:
                        rounds = [
                            await measure(mode, url, parser_name, args.decisions, concurrency)
                            for _ in range(args.rounds)
                        ]
                        best = min(rounds, key=lambda r: r["cpu_us"])
                        row = {"mode": mode, "parser": parser_name, "concurrency": concurrency}
                        results.append({**row, **best})
                        print(
                            f"{mode:8} {parser_name:8} {concurrency:5d} {best['cpu_us']:8.1f} "
                            f"{best['redis_cpu_us']:9.2f} {best['round_trips_per_decision']:9.3f} "
                            f"{best['wall_us']:8.1f}",
                            flush=True,
                        )
        finally:
            proc.kill()
            proc.wait(10)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
