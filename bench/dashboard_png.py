"""Draws the main panels of config/grafana/tower-gateway.json from a benchmark run's metrics.

No Grafana runs here: a gateway (with the fake tower and upstream of `slow_tower.py`)
takes a bounded load on 127.0.0.1 for `--seconds`, `/metrics` is scraped every second,
and matplotlib (installed with pip when missing, as `run.py` does) plots the rates and
quantiles the dashboard's queries compute. Midway the tower hangs for a while, so the
tower and cache panels have something to show.

    python bench/dashboard_png.py [--seconds 60] [--out config/grafana/dashboard.png]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ensure_matplotlib
from slow_tower import ROOT, Stack, stack

Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Sample:
    out: Sample = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(sample: Sample, name: str, by: str | None = None) -> dict[str, float]:
    """Sum of a metric's series, grouped by one label (or all under "")."""
    sums: dict[str, float] = defaultdict(float)
    for (n, labels), value in sample.items():
        if n == name:
            sums[dict(labels).get(by, "") if by else ""] += value
    return sums


def quantile(
    q: float, before: Sample, after: Sample, name: str, by: str | None
) -> dict[str, float]:
    """histogram_quantile(q, sum by (le, by) (increase(name_bucket))), linearly interpolated."""
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for (n, labels), value in after.items():
        if n != name + "_bucket":
            continue
        d = dict(labels)
        le = float(d["le"])
        buckets[d.get(by, "") if by else ""][le] += value - before.get((n, labels), 0.0)
    out = {}
    for group, counts in buckets.items():
        bounds = sorted(counts)
        count = counts[bounds[-1]]
        if count <= 0:
            continue
        rank, lower, seen = q * count, 0.0, 0.0
        for bound in bounds:
            if counts[bound] >= rank:
                if bound == float("inf"):
                    out[group] = lower
                else:
                    width = counts[bound] - seen
                    out[group] = lower + (bound - lower) * ((rank - seen) / width if width else 1)
                break
            lower, seen = bound, counts[bound]
    return out


async def load(s: Stack, seconds: float, hang: tuple[float, float]) -> list[tuple[float, Sample]]:
    keys = [f"k-{i}" for i in range(200)]
    paths = ["/api/orders", "/api/users", "/tools/run", "/public/status"]
    scrapes: list[tuple[float, Sample]] = []
    start = time.monotonic()
    end = start + seconds
    async with aiohttp.ClientSession() as http:

        async def client() -> None:
            while time.monotonic() < end:
                path = random.choice(paths)
                roll = random.random()
                key = "bad-key" if roll < 0.03 else random.choice(keys)
                headers = {} if path.startswith("/public") else {"X-API-Key": key}
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(s.base + path, headers=headers) as r:
                        await r.read()
                await asyncio.sleep(random.uniform(0.005, 0.03))

        async def scraper() -> None:
            while time.monotonic() < end:
                elapsed = time.monotonic() - start
                s.tower.answering.clear() if hang[0] <= elapsed < hang[1] else (
                    s.tower.answering.set()
                )
                async with http.get(s.ops + "/metrics") as r:
                    scrapes.append((elapsed, parse(await r.text())))
                await asyncio.sleep(1.0)
            s.tower.answering.set()

        await asyncio.gather(scraper(), *(client() for _ in range(6)))
    return scrapes


def draw(scrapes: list[tuple[float, Sample]], out: Path, hang: tuple[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(itertools.pairwise(scrapes))
    t = [b[0] for _, b in pairs]

    def rate(name: str, by: str | None = None) -> dict[str, list[float]]:
        series: dict[str, list[float]] = defaultdict(list)
        groups = set(total(scrapes[-1][1], name, by))
        for (ta, a), (tb, b) in pairs:
            ra, rb = total(a, name, by), total(b, name, by)
            for g in groups:
                series[g].append((rb.get(g, 0.0) - ra.get(g, 0.0)) / (tb - ta))
        return series

    def q99(name: str, by: str | None) -> dict[str, list[float]]:
        series: dict[str, list[float]] = defaultdict(list)
        groups = set(quantile(0.99, {}, scrapes[-1][1], name, by))
        for (_, a), (_, b) in pairs:
            got = quantile(0.99, a, b, name, by)
            for g in groups:
                series[g].append(got.get(g, float("nan")) * 1000)
        return series

    fig, axes = plt.subplots(3, 2, figsize=(13, 10), constrained_layout=True)
    panels = [
        ("Requests per second by route", rate("tower_gateway_requests_total", "route"), "req/s"),
        (
            "Upstream latency p99 by route",
            q99("tower_gateway_upstream_response_seconds", "route"),
            "ms",
        ),
        ("Auth outcomes by reason", rate("tower_gateway_auth_total", "outcome"), "req/s"),
        (
            "Tower latency p99 by outcome",
            q99("tower_gateway_tower_request_seconds", "outcome"),
            "ms",
        ),
    ]
    hits, misses = (
        rate("tower_gateway_cache_hits_total")[""],
        rate("tower_gateway_cache_misses_total")[""],
    )
    ratio = {
        "hit ratio": [
            h / (h + m) if h + m else float("nan") for h, m in zip(hits, misses, strict=True)
        ]
    }
    panels.append(("Cache hit ratio", ratio, "ratio"))
    cache = {
        "served while refreshing (stale)": rate("tower_gateway_cache_stale_serves_total")[""],
        "background refreshes": rate("tower_gateway_cache_refreshes_total")[""],
        "waited for the tower": rate("tower_gateway_cache_tower_waits_total")[""],
    }
    panels.append(("Cache: served while refreshing, refreshes, waits", cache, "per s"))
    for ax, (title, series, unit) in zip(axes.flat, panels, strict=True):
        for label, values in sorted(series.items()):
            ax.plot(t, values, label=label or "all", linewidth=1.4)
        ax.axvspan(*hang, color="tab:red", alpha=0.08, label="tower hangs")
        ax.set_title(title, fontsize=11)
        ax.set_ylabel(unit)
        ax.set_xlabel("seconds into the run")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        "tower-gateway: the dashboard's main panels, drawn with matplotlib from /metrics "
        "scraped each second of a benchmark run (not a Grafana screenshot)",
        fontsize=10,
    )
    fig.savefig(out, dpi=90)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--ttl", type=float, default=5.0)
    p.add_argument("--out", default=str(ROOT / "config" / "grafana" / "dashboard.png"))
    args = p.parse_args()
    if not ensure_matplotlib():
        print("matplotlib is not available: no chart", file=sys.stderr)
        return 1
    hang = (args.seconds * 0.4, args.seconds * 0.6)

    def routes(upstream: str) -> list[dict[str, object]]:
        return [
            {"path": "/public", "upstream": upstream, "auth": False},
            {"path": "/api/orders", "upstream": upstream},
            {"path": "/api/users", "upstream": upstream},
            {"path": "/tools", "upstream": upstream},
        ]

    async def run() -> list[tuple[float, Sample]]:
        async with stack(str(ROOT), {"ttl": args.ttl}, routes=routes) as s:
            return await load(s, args.seconds, hang)

    draw(asyncio.run(run()), Path(args.out), hang)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
