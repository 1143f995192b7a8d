"""The Grafana dashboard in config/grafana/ queries only what the gateway exports.

A gateway is exercised (a success, refusals, a rate limit, a tower call) and its
`/metrics` read; every metric name in every panel's query must be a series or family
there, and every label a query groups by must be a label of those series.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GatewayFactory

DASHBOARD = Path(__file__).resolve().parent.parent / "config" / "grafana" / "tower-gateway.json"
METRIC = re.compile(r"\btower_gateway_[a-z0-9_]+")
BY = re.compile(r"\bby\s*\(([^)]*)\)")


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def exported(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Names a query may use (families and their series) and the labels seen per name."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        for suffix in suffixes:
            names.add(family.name + suffix)
        for sample in family.samples:
            names.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for subject in ("route", "auth", "hit ratio", "tower", "circuit", "rate-limit", "redis"):
        assert subject in titles
    assert "websocket" in titles


async def test_every_metric_the_dashboard_queries_is_exported(
    make_gateway: GatewayFactory,
) -> None:
    h = await make_gateway(rate_limit={"default_per_minute": 1, "burst": 1})
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    assert (await h.client.get("/x", headers={"X-API-Key": "good-key-1"})).status == 200
    assert (await h.client.get("/x", headers={"X-API-Key": "good-key-1"})).status == 429
    assert (await h.client.get("/x", headers={"X-API-Key": "wrong-key"})).status == 401
    assert (await h.client.get("/public/x")).status == 200
    names, labels = exported(await h.metrics())

    dashboard = json.loads(DASHBOARD.read_text())
    checked = 0
    for title, expr in queries(dashboard):
        used = METRIC.findall(expr)
        assert used, (title, expr)
        for name in used:
            assert name in names, f"{title}: {name} is not in /metrics"
            checked += 1
        grouped = {label.strip() for match in BY.findall(expr) for label in match.split(",")}
        grouped -= {"", "le"}
        seen = set().union(*(labels.get(name, set()) for name in used))
        if seen:  # series with samples: the labels grouped by must be theirs
            assert grouped <= seen, f"{title}: grouped by {grouped - seen}, not a label"
    assert checked >= 20


def test_an_unknown_metric_would_be_caught() -> None:
    names, _ = exported("# TYPE tower_gateway_x counter\ntower_gateway_x_total 1\n")
    assert "tower_gateway_x_total" in names
    assert "tower_gateway_y_total" not in names
