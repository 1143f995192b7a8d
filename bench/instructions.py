#!/usr/bin/env python3
"""Instructions per request, gateway against the bare forwarder: the steady figure.

    python bench/instructions.py [--requests 2000] [--concurrency 8]

Wall-clock rows swing with the machine (a shared VM's cores change speed from one
second to the next); the number of instructions a process executes per request
does not. This runs the proxy under test inside valgrind's callgrind with
instrumentation off, warms it, counts the user-space instructions of exactly N
cached-key requests, and does the same for the bare aiohttp forwarder. The
requests carry what wrk sends in bench/run.py (Host and X-API-Key), from a client
in this process, to the gateway of row b (`run.gateway_config`) and the same
upstream and fake tower (bench/servers.py). System
calls are not counted: the kernel's share per request is about the same for both
(the gateway makes one write fewer), so the ratio is the user-space cost ratio.

Installs valgrind with apt-get when missing (as root). About a minute.

`--tracing RATIO` turns on span export (`tracing.otlp_endpoint`, the bench upstream as the
collector, `sample_ratio` RATIO), so the cost of spans is counted with the request, export
thread included; `--tree DIR` runs the gateway from another source tree (an export of
another commit) to compare; `--gateway-only` skips the bare forwarder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import aiohttp

from run import BENCH_DIR, CACHED_KEY, HOST, ROOT, bench_env, free_port, gateway_config

WARM_REQUESTS: Final = 300


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not come up within {timeout:.0f}s")


def ensure_valgrind() -> str:
    found = shutil.which("callgrind_control") and shutil.which("valgrind")
    if not found and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "valgrind"], check=False)
    valgrind = shutil.which("valgrind")
    if valgrind is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is needed (apt-get install valgrind)")
    return valgrind


async def drive(url: str, count: int, concurrency: int) -> int:
    """`count` GETs with only Host and X-API-Key, as wrk sends them; the non-200 count."""
    bad = 0
    queue = iter(range(count))
    connector = aiohttp.TCPConnector(limit=concurrency)
    skip = ("User-Agent", "Accept", "Accept-Encoding")
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=skip) as session:

        async def worker() -> None:
            nonlocal bad
            for _ in queue:
                async with session.get(url, headers={"X-API-Key": CACHED_KEY}) as response:
                    await response.read()
                    bad += response.status != 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return bad


def callgrind_total(out: Path) -> int:
    """The instructions counted in the dumps written since instrumentation was on."""
    totals = [
        int(line.split()[1])
        for dump in out.parent.glob(out.name + ".*")
        for line in dump.read_text(errors="replace").splitlines()
        if line.startswith("totals:")
    ]
    if not totals:
        raise SystemExit(f"no callgrind dump next to {out}")
    return max(totals)


@contextlib.contextmanager
def started(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(
    name: str, argv: list[str], url: str, args: argparse.Namespace, env: dict[str, str], work: Path
) -> float:
    out = work / f"callgrind.{name}"
    valgrind = [
        args.valgrind,
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
    ]
    with started(valgrind + argv, env, work / f"{name}.log") as proc:
        wait_http(url, 300)
        asyncio.run(drive(url, WARM_REQUESTS, args.concurrency))
        subprocess.run(
            ["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True
        )
        bad = asyncio.run(drive(url, args.requests, args.concurrency))
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        time.sleep(1)
    if bad:
        raise SystemExit(f"{name}: {bad} of {args.requests} requests did not answer 200")
    return callgrind_total(out) / args.requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default=str(BENCH_DIR / "results"))
    parser.add_argument("--tracing", type=float, default=None, metavar="RATIO")
    parser.add_argument("--tree", default=None, help="source tree of the gateway under test")
    parser.add_argument("--gateway-only", action="store_true")
    args = parser.parse_args()
    args.valgrind = ensure_valgrind()
    # valgrind must start the interpreter itself, not a shim script (pyenv's); a venv's
    # python is a link to the interpreter and must stay as it is, or the venv is lost.
    in_venv = sys.prefix != sys.base_prefix
    python = sys.executable if in_venv else os.path.realpath(sys.executable)
    env = bench_env()
    up, tower = free_port(), free_port()
    servers = BENCH_DIR / "servers.py"
    with tempfile.TemporaryDirectory(prefix="tg-instructions-") as tmp:
        work = Path(tmp)
        with (
            started([python, str(servers), "upstream", "--port", str(up)], env, work / "up.log"),
            started([python, str(servers), "tower", "--port", str(tower)], env, work / "tw.log"),
        ):
            wait_http(f"http://{HOST}:{up}/", 30)
            wait_http(f"http://{HOST}:{tower}/", 30)
            port, ops = free_port(), free_port()
            config = gateway_config(f"http://{HOST}:{up}", f"http://{HOST}:{tower}", port, ops)
            if args.tracing is not None:
                config["tracing"] = {
                    "otlp_endpoint": f"http://{HOST}:{up}/v1/traces",  # answers 200 to all
                    "sample_ratio": args.tracing,
                }
            gateway_env = env
            if args.tree is not None:
                tree = str(Path(args.tree).resolve())  # first, so its `gateway` is imported
                gateway_env = {**env, "PYTHONPATH": os.pathsep.join([tree, env["PYTHONPATH"]])}
            (work / "gateway.yaml").write_text(json.dumps(config))  # JSON is YAML
            print(f"gateway: {args.requests} cached-key requests under callgrind ...", flush=True)
            gateway = measure(
                "gateway",
                [python, "-m", "gateway", "serve", "--config", str(work / "gateway.yaml")],
                f"http://{HOST}:{port}/x",
                args,
                gateway_env,
                work,
            )
            if args.gateway_only:
                print(f"instructions per request: gateway {gateway:,.0f}")
                return
            print("bare forwarder: the same ...", flush=True)
            bare_port = free_port()
            bare = measure(
                "bare",
                [
                    python,
                    str(BENCH_DIR / "bare_forwarder.py"),
                    "--port",
                    str(bare_port),
                    "--upstream",
                    f"http://{HOST}:{up}",
                ],
                f"http://{HOST}:{bare_port}/x",
                args,
                env,
                work,
            )
    ratio = bare / gateway
    print(
        f"instructions per request: gateway {gateway:,.0f}, bare forwarder {bare:,.0f}; "
        f"bare / gateway {ratio:.3f} (user space, {args.requests} requests, "
        f"{args.concurrency} connections)"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    result = {
        "gateway_instructions_per_request": round(gateway),
        "bare_instructions_per_request": round(bare),
        "bare_over_gateway": round(ratio, 4),
        "requests": args.requests,
        "concurrency": args.concurrency,
    }
    (out / f"instructions-{stamp}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
