#!/usr/bin/env python3
"""Micro-benchmarks of the gateway's per-request work, in-process, without a network.

    python bench/micro.py [--quick] [--json FILE]
    nice -n -10 taskset -c 0 python bench/micro.py   # steadier on a busy machine

Every component is the one `Gateway` wires from a config built with
`gateway.config.parse_config`, with a tiny in-process tower behind the identity
cache. Timings are the best of several `timeit` rounds, per call, so they are
the CPU cost of the code itself (no event loop scheduling, no sockets). A
cache-hit `resolve` never awaits, so its coroutine is driven by hand.

Also measured: the memory one cached identity costs (identity cache, and the
reused-JWT cache), with `tracemalloc`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
import timeit
import tracemalloc
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry
from yarl import URL

ROOT: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.app import Gateway  # noqa: E402
from gateway.auth.routes import normalise_path  # noqa: E402
from gateway.config import Config, parse_config  # noqa: E402
from gateway.http.answers import request_id  # noqa: E402
from gateway.http.headers import connection_tokens  # noqa: E402
from gateway.tower import Identity, TowerAnswer, parse_answer  # noqa: E402

ENV: Final = {
    "TOWER_API_KEY": "micro-tower-key",
    "TOWER_SECRET": "micro-tower-secret",
    "GATEWAY_JWT_SECRET": "micro-jwt-secret-0123456789abcdef0123456789",
}
KEY: Final = "tk_live_0123456789abcdefghijklmnopqrstuv"
# What a typical API client sends; the key travels in X-API-Key.
TYPICAL_HEADERS: Final = (
    ("Host", "api.example.com"),
    ("User-Agent", "python-httpx/0.27.0"),
    ("Accept", "application/json"),
    ("Accept-Encoding", "gzip, deflate"),
    ("Connection", "keep-alive"),
    ("Content-Type", "application/json"),
    ("Content-Length", "42"),
    ("X-API-Key", KEY),
    ("X-Request-Id", "req-0123456789abcdef"),
    ("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ("Cookie", "session=abc; theme=dark"),
    ("X-Forwarded-For", "203.0.113.7"),
)


class InProcessTower:
    """Answers like a remote tower would, without a socket: every key is valid."""

    name = "in-process"

    def __init__(self) -> None:
        self.calls = 0

    async def validate(self, api_key: str) -> TowerAnswer:
        self.calls += 1
        return parse_answer(
            200,
            {
                "valid": True,
                "key_id": f"kid-{api_key[-12:]}",
                "user_id": f"user-{api_key[-12:]}",
                "role": "operator",
                "scopes": ["tools:execute"],
                "metadata": {"team": "blue"},
            },
        )

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def make_config(algorithm: str = "HS256", key_file: str | None = None) -> Config:
    jwt: dict[str, Any] = {"algorithm": algorithm}
    if key_file is not None:
        jwt["private_key_file"] = key_file
    return parse_config(
        {
            "tower": {"url": "http://127.0.0.1:9999"},
            "routes": [
                {
                    "path": "/tools",
                    "upstream": "http://127.0.0.1:9000",
                    "require": ["execute:read_file"],
                },
                {"path": "/", "upstream": "http://127.0.0.1:9000"},
            ],
            "jwt": jwt,
            "log": {"access": False},
        },
        env=ENV,
    )


def make_gateway(config: Config) -> Gateway:
    return Gateway(config, tower=InProcessTower(), registry=CollectorRegistry())


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that never suspends (a cache hit) to its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the coroutine suspended: not a cache hit")


def write_keys(folder: Path) -> dict[str, str]:
    keys: dict[str, Any] = {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }
    paths = {}
    for algorithm, key in keys.items():
        path = folder / f"{algorithm}.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        paths[algorithm] = str(path)
    return paths


# --------------------------------------------------------------------------- timing


class Table:
    def __init__(self, min_time: float, rounds: int) -> None:
        self.min_time = min_time
        self.rounds = rounds
        self.rows: list[dict[str, Any]] = []

    def time(self, group: str, name: str, fn: Callable[[], object], note: str = "") -> float:
        timer = timeit.Timer(fn)
        number, _ = timer.autorange()
        number = max(1, int(number * self.min_time / 0.2))
        best = min(timer.repeat(repeat=self.rounds, number=number)) / number
        self.rows.append(
            {"group": group, "name": name, "us": best * 1e6, "calls": number, "note": note}
        )
        return best

    def format(self) -> str:
        lines = [f"{'what':<58} {'µs/call':>9} {'calls/s':>11}  note", "-" * 100]
        group = None
        for row in self.rows:
            if row["group"] != group:
                group = row["group"]
                lines.append(f"[{group}]")
            lines.append(
                f"  {row['name']:<56} {row['us']:>9.2f} {1e6 / row['us']:>11,.0f}  {row['note']}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- benchmarks


def bench_auth(table: Table) -> None:
    gateway = make_gateway(make_config())
    parts = gateway.components
    route = parts.routes.match("/tools/read", "GET")
    headers = CIMultiDictProxy(CIMultiDict(TYPICAL_HEADERS))
    loop = asyncio.new_event_loop()
    resolved = loop.run_until_complete(gateway.resolver.resolve(KEY))  # the one tower call
    grants = parts.mapper.grants(resolved.identity)
    gateway.minter.token_for(resolved.digest, resolved.identity, grants)

    def decision() -> str:
        key = parts.extractor.extract(headers)
        assert key is not None
        hit = run_sync(gateway.resolver.resolve(key))
        granted = parts.mapper.grants(hit.identity)
        if granted.missing(route.require) is not None:
            raise AssertionError("denied")
        token: str = gateway.minter.token_for(hit.digest, hit.identity, granted)
        return token

    group = "auth decision, cache hit"
    table.time(
        group,
        "extract + resolve + grants + missing + token_for",
        decision,
        "the whole per-request auth cost",
    )
    table.time(
        group,
        "CredentialExtractor.extract (typical headers)",
        lambda: parts.extractor.extract(headers),
    )
    table.time(
        group,
        "Fingerprinter.digest (keyed BLAKE2b of the key)",
        lambda: gateway.fingerprinter.digest(KEY),
        "inside resolve",
    )
    table.time(
        group,
        "IdentityResolver.resolve (hit, coroutine driven by hand)",
        lambda: run_sync(gateway.resolver.resolve(KEY)),
    )
    positive = gateway.resolver._positive
    table.time(
        group, "  of which: the identity cache get (hit)", lambda: positive.get(resolved.digest)
    )
    plain = {resolved.digest: resolved}
    table.time(group, "  for scale: dict.get (hit)", lambda: plain.get(resolved.digest))
    table.time(
        group, "CapabilityMapper.grants (memoised)", lambda: parts.mapper.grants(resolved.identity)
    )
    table.time(
        group,
        "TokenMinter.token_for (reuse)",
        lambda: gateway.minter.token_for(resolved.digest, resolved.identity, grants),
    )
    table.time(
        "capability check",
        "Grants.missing(route.require) (memoised verdict)",
        lambda: grants.missing(route.require),
    )
    fresh = parts.mapper._compute(resolved.identity.role, resolved.identity.scopes)
    table.time(
        "capability check",
        "Grants.allows, first check (fnmatch, no memo)",
        lambda: (fresh._verdicts.clear(), fresh.allows("execute:read_file")),
        "once per (grants, capability)",
    )
    loop.close()


def bench_jwt(table: Table, folder: Path) -> None:
    key_files: dict[str, str | None] = {"HS256": None, **write_keys(folder)}
    for algorithm, key_file in key_files.items():
        _jwt_rows(table, algorithm, key_file)


def _jwt_rows(table: Table, algorithm: str, key_file: str | None) -> None:
    gateway = make_gateway(make_config(algorithm, key_file))
    minter = gateway.minter
    identity = run_identity()
    grants = gateway.components.mapper.grants(identity)
    digest = gateway.fingerprinter.digest(KEY)
    minter.token_for(digest, identity, grants)
    counter = iter(range(10**9))

    def fresh() -> str:
        # A new cache slot every call: always signs (and stores the token).
        token: str = minter.token_for(next(counter).to_bytes(8, "big"), identity, grants)
        return token

    reuse_s = table.time(
        "JWT", f"{algorithm}: token_for, reused", lambda: minter.token_for(digest, identity, grants)
    )
    fresh_s = table.time("JWT", f"{algorithm}: token_for, fresh signature", fresh)
    table.rows[-1]["note"] = f"{fresh_s / reuse_s:,.0f}x the reuse"


def run_identity() -> Identity:
    answer = asyncio.run(InProcessTower().validate(KEY))
    assert isinstance(answer, Identity)
    return answer


def bench_headers(table: Table) -> None:
    gateway = make_gateway(make_config())
    policy = gateway.components.headers
    headers = CIMultiDictProxy(CIMultiDict(TYPICAL_HEADERS))
    tokens = connection_tokens(headers)
    group = f"header rewrite ({len(TYPICAL_HEADERS)} typical request headers)"
    table.time(group, "HeaderPolicy.forwardable", lambda: policy.forwardable(headers, tokens))
    table.time(group, "connection_tokens", lambda: connection_tokens(headers))


def bench_pipeline_pieces(table: Table) -> None:
    """The other per-request steps of the proxy listener's `handle`, to rank them against auth."""
    gateway = make_gateway(make_config())
    routes = gateway.components.routes
    metrics = gateway.metrics
    route = routes.match("/tools/read", "GET")
    group = "other per-request steps"
    table.time(
        group,
        "request_id(None): 128 random bits",
        lambda: request_id(None),
        "when the client sends none",
    )
    table.time(group, "request_id(valid client value)", lambda: request_id("req-0123456789abcdef"))
    table.time(group, "normalise_path('/tools/read')", lambda: normalise_path("/tools/read"))
    table.time(group, "RouteTable.match", lambda: routes.match("/tools/read", "GET"))
    table.time(group, "Metrics.count_request", lambda: metrics.count_request(route.name, 200))
    table.time(group, "Metrics.count_auth", lambda: metrics.count_auth("success"))
    table.time(
        group,
        "Metrics.observe_upstream",
        lambda: metrics.observe_upstream(route.name, 0.001),
        "histogram buckets as plain integers",
    )
    table.time(
        group,
        "yarl URL(..., encoded=True) for the upstream",
        lambda: URL("http://127.0.0.1:9000/tools/read?x=1", encoded=True),
    )
    table.time(group, "time.perf_counter() x2", lambda: (time.perf_counter(), time.perf_counter()))


def memory_per_identity(count: int) -> dict[str, Any]:
    """tracemalloc: bytes held per cached identity, and per reused JWT kept with it."""
    gateway = make_gateway(make_config())
    mapper = gateway.components.mapper
    keys = [f"tk_live_{i:032d}" for i in range(count)]
    loop = asyncio.new_event_loop()

    async def fill() -> list[Any]:
        out = []
        for start in range(0, count, 1000):
            out += await asyncio.gather(
                *(gateway.resolver.resolve(k) for k in keys[start : start + 1000])
            )
        return out

    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    before = tracemalloc.take_snapshot()
    resolved = loop.run_until_complete(fill())
    after_cache, _ = tracemalloc.get_traced_memory()
    for r in resolved:
        gateway.minter.token_for(r.digest, r.identity, mapper.grants(r.identity))
    after_tokens, _ = tracemalloc.get_traced_memory()
    # What the cache holds on its own: drop the benchmark's references first.
    del resolved
    held_cache_and_tokens, _ = tracemalloc.get_traced_memory()
    sites = tracemalloc.take_snapshot().compare_to(before, "lineno")
    tracemalloc.stop()
    loop.close()
    top = []
    for stat in sites[:12]:
        frame = stat.traceback[0]
        where = frame.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        top.append(
            {"site": f"{where}:{frame.lineno}", "bytes_per_identity": round(stat.size_diff / count)}
        )
    cache = (after_cache - base) / count
    tokens = (after_tokens - after_cache) / count
    total = (held_cache_and_tokens - base) / count
    return {
        "identities": count,
        "identity_cache_bytes": round(cache),
        "jwt_cache_bytes": round(tokens),
        "total_bytes_held": round(total),
        "projected_100k_mb": round(total * 100_000 / 2**20, 1),
        "top_allocation_sites": top,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="micro-benchmarks of the gateway hot path")
    parser.add_argument("--quick", action="store_true", help="shorter rounds")
    parser.add_argument("--memory-identities", type=int, default=20_000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    table = Table(min_time=0.05 if args.quick else 0.1, rounds=5 if args.quick else 7)
    with tempfile.TemporaryDirectory(prefix="tower-gateway-micro-") as tmp:
        bench_auth(table)
        bench_jwt(table, Path(tmp))
    bench_headers(table)
    bench_pipeline_pieces(table)
    memory = memory_per_identity(args.memory_identities)
    print(
        f"tower-gateway micro-benchmarks (Python {platform.python_version()}, best of "
        f"{table.rounds} rounds, per call)"
    )
    print(table.format())
    print(
        f"\nmemory per cached identity (tracemalloc, {memory['identities']:,} identities): "
        f"identity cache {memory['identity_cache_bytes']:,} B, reused-JWT cache "
        f"{memory['jwt_cache_bytes']:,} B, held together {memory['total_bytes_held']:,} B "
        f"-> {memory['projected_100k_mb']} MB per 100k (Python objects only, no allocator "
        f"overhead)"
    )
    print("  where it is allocated (bytes per identity, by source line):")
    for site in memory["top_allocation_sites"]:
        if site["bytes_per_identity"] >= 8:
            note = "  (strings of the tower answer)" if site["site"].startswith("bench/") else ""
            print(f"    {site['bytes_per_identity']:>6,}  {site['site']}{note}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": table.rows, "memory": memory}, indent=2))


if __name__ == "__main__":
    main()
