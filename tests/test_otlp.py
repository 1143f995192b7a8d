"""Spans over OTLP/HTTP: exported in batches to a fake collector on loopback.

The collector is an aiohttp app that decodes each `POST /v1/traces` body with the
OTLP protobuf definitions and keeps the spans, and the raw bodies (no key in them).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gateway.errors import ConfigError
from tests.conftest import GatewayFactory, Harness, gateway_config, until
from tests.redis_support import RedisServer
from tests.test_tracing import CLIENT_SPAN, PARENT, TRACE, parts

GOOD = {"X-API-Key": "good-key-1"}


def attribute(value: Any) -> str | int:
    return str(value.string_value) if value.HasField("string_value") else int(value.int_value)


@dataclass
class Collector:
    spans: list[dict[str, Any]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    url: str = ""

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource in export.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                for s in scope.spans:
                    attributes = {a.key: attribute(a.value) for a in s.attributes}
                    self.spans.append(
                        {
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(),
                            "kind": s.kind,
                            "attributes": attributes,
                            "service": service.get("service.name"),
                        }
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def named(self, name: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["name"] == name]


@pytest.fixture
async def collector(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Collector:
    c = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", c._traces)
    server = await aiohttp_server(app, host="127.0.0.1")
    c.url = str(server.make_url("/v1/traces"))
    return c


async def traced(make_gateway: GatewayFactory, endpoint: str, **tracing: Any) -> Harness:
    h = await make_gateway(
        tracing={"otlp_endpoint": endpoint, "export_interval": 0.05, "timeout": 1, **tracing},
        rate_limit={"default_per_minute": 0},
    )
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    return h


async def test_a_request_exports_its_spans_in_the_clients_trace(
    make_gateway: GatewayFactory, collector: Collector
) -> None:
    h = await traced(make_gateway, collector.url)
    response = await h.client.get("/x", headers={**GOOD, "traceparent": PARENT})
    assert response.status == 200
    names = ("GET root", "identity lookup", "tower validate", "upstream")
    await until(lambda: all(collector.named(n) for n in names), what="the four spans")

    request = collector.named("GET root")[0]
    lookup = collector.named("identity lookup")[0]
    tower = collector.named("tower validate")[0]
    upstream = collector.named("upstream")[0]
    assert {s["trace_id"] for s in (request, lookup, tower, upstream)} == {TRACE}
    assert request["parent"] == CLIENT_SPAN  # the client's span
    assert lookup["parent"] == upstream["parent"] == request["span_id"]
    assert tower["parent"] == lookup["span_id"]
    # What the tower and the upstream were told is their parent is the span recorded.
    assert parts(h.tower.headers[0]["traceparent"])[1] == tower["span_id"]
    assert parts(h.upstream.seen[0].header("traceparent"))[1] == upstream["span_id"]

    attributes = request["attributes"]
    assert attributes["http.route"] == "root"
    assert attributes["http.response.status_code"] == 200
    assert attributes["tower_gateway.decision"] == "allow"
    assert attributes["tower_gateway.key_fingerprint"] == h.gateway.fingerprinter.short(
        h.gateway.fingerprinter.digest("good-key-1")
    )
    assert lookup["attributes"]["tower_gateway.cache"] == "tower"
    assert request["service"] == "tower-gateway"
    assert not any(b"good-key-1" in body for body in collector.bodies)  # never the key

    text = await h.metrics()
    assert 'tower_gateway_trace_spans_total{outcome="failed"} 0.0' in text


async def test_a_refusal_is_exported_with_its_reason(
    make_gateway: GatewayFactory, collector: Collector
) -> None:
    h = await traced(make_gateway, collector.url)
    assert (await h.client.get("/x", headers={"X-API-Key": "wrong-key"})).status == 401
    await until(lambda: collector.named("GET root"), what="the request span")
    attributes = collector.named("GET root")[0]["attributes"]
    assert attributes["tower_gateway.reason"] == "invalid_key"
    assert attributes["tower_gateway.decision"] == "deny"
    assert collector.named("identity lookup")[0]["attributes"]["tower_gateway.reason"] == (
        "invalid_key"
    )
    assert not any(b"wrong-key" in body for body in collector.bodies)


async def test_a_new_trace_is_sampled_by_ratio_a_continued_one_by_its_flag(
    make_gateway: GatewayFactory, collector: Collector
) -> None:
    h = await traced(make_gateway, collector.url, sample_ratio=0)
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    _, _, flags = parts(h.upstream.seen[0].header("traceparent"))
    assert int(flags, 16) & 1 == 0  # not recorded, and the upstream is told so
    unsampled = PARENT[:-2] + "00"  # a client that records nothing of this trace
    assert (await h.client.get("/x", headers={**GOOD, "traceparent": unsampled})).status == 200
    assert parts(h.upstream.seen[1].header("traceparent"))[::2] == (TRACE, "00")
    assert (await h.client.get("/x", headers={**GOOD, "traceparent": PARENT})).status == 200
    await until(lambda: collector.named("GET root"), what="the sampled request's span")
    assert {s["trace_id"] for s in collector.spans} == {TRACE}
    assert len(collector.named("GET root")) == 1  # the sampled one only


async def test_a_collector_that_is_down_costs_requests_nothing_and_is_counted(
    make_gateway: GatewayFactory, collector: Collector
) -> None:
    h = await traced(make_gateway, "http://127.0.0.1:9/v1/traces")  # nothing listens there
    started = time.perf_counter()
    for _ in range(10):
        assert (await h.client.get("/x", headers=GOOD)).status == 200
    assert time.perf_counter() - started < 5  # ten requests, not ten export timeouts

    async def failed() -> bool:
        text = await h.metrics()
        for line in text.splitlines():
            if line.startswith('tower_gateway_trace_spans_total{outcome="failed"}'):
                return float(line.split()[-1]) > 0
        return False

    await until(failed, what="the dropped spans counted")


def test_tracing_settings_are_checked() -> None:
    for key, value in (("otlp_endpoint", "ftp://x"), ("sample_ratio", 1.5), ("timeout", 0)):
        with pytest.raises(ConfigError) as info:
            gateway_config("http://127.0.0.1:9999", "http://127.0.0.1:9000", tracing={key: value})
        assert info.value.path == f"tracing.{key}"


async def test_without_an_endpoint_no_spans_are_recorded(make_gateway: GatewayFactory) -> None:
    h = await make_gateway()
    assert h.gateway.spans is None
    assert "tower_gateway_trace_spans_total" not in await h.metrics()


@pytest.mark.redis
async def test_the_shared_redis_cache_has_its_span(
    make_gateway: GatewayFactory, collector: Collector, redis_server: RedisServer
) -> None:
    h = await make_gateway(
        tracing={"otlp_endpoint": collector.url, "export_interval": 0.05, "timeout": 1},
        redis={"url": redis_server.url},
    )
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    assert (await h.client.get("/x", headers={**GOOD, "traceparent": PARENT})).status == 200
    await until(lambda: collector.named("redis shared cache"), what="the redis span")
    await until(lambda: collector.named("tower validate"), what="the tower span")
    redis_span = collector.named("redis shared cache")[0]
    assert redis_span["trace_id"] == TRACE
    assert redis_span["parent"] == collector.named("identity lookup")[0]["span_id"]
    # The tower is asked from inside the shared lookup (one call for every replica).
    assert collector.named("tower validate")[0]["parent"] == redis_span["span_id"]
