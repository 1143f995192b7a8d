"""The decision listener (`decision:`, CONTRACT 9): "may this request pass, and with
which JWT?" for an nginx, Caddy, Traefik or Envoy in front.

`/auth` reads the original request from `X-Original-*` or `X-Forwarded-*`
headers, `/ext_authz/{path}` from Envoy's check request; every answer comes from
`engine.decide`, the proxy listener's own pipeline. The listener believes what
the data plane says about the client, so it must be reachable by the data plane
only: bind it to loopback or a private network, and set `decision.token` (sent
by the generated configs in `X-Tower-Gateway-Decision-Token`) or
`decision.allow_from`, so a client that reaches it anyway cannot forge an
original request.

Served like the proxy listener (`GatewayRunner`, one `ANSWER` handler, no
router); each decision is counted in `tower_gateway_decisions_total{route,outcome}`,
audited as a proxied request is, and written to the access log as a
`"type": "decision"` line naming the original method and path.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import time
import weakref
from collections.abc import Iterator
from typing import Final

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.app import Gateway
from gateway.config import DecisionConfig
from gateway.decision import answer
from gateway.decision.engine import decide
from gateway.decision.original import EXT_AUTHZ_PREFIX, Original, from_auth, from_ext_authz
from gateway.errors import Forbidden, GatewayError, NotFound
from gateway.http.answers import request_id
from gateway.http.forwarded import IPNetwork
from gateway.http.headers import REQUEST_ID
from gateway.http.server import ANSWER, TIMEOUTS, Timeouts
from gateway.ops.accesslog import RequestRecord
from gateway.proxy.listener import http_log

log = logging.getLogger("tower_gateway.decision")

TOKEN_HEADER: Final = "X-Tower-Gateway-Decision-Token"
AUTH_PATH: Final = "/auth"
# Per gateway: decisions by (route, outcome), read at scrape time like the request counts.
_COUNTS: weakref.WeakKeyDictionary[Gateway, dict[tuple[str, str], int]] = (
    weakref.WeakKeyDictionary()
)


class _DecisionCollector(Collector):
    def __init__(self, counts: dict[tuple[str, str], int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "tower_gateway_decisions",
            "Decisions answered on the decision listener, by route and outcome",
            labels=["route", "outcome"],
        )
        for (route, outcome), value in list(self._counts.items()):
            family.add_metric([route, outcome], value)
        yield family


def decision_counts(gateway: Gateway) -> dict[tuple[str, str], int]:
    counts = _COUNTS.get(gateway)
    if counts is None:
        counts = _COUNTS[gateway] = {}
        gateway.registry.register(_DecisionCollector(counts))
    return counts


class DecisionListener:
    """Answers decision requests for one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.counts = decision_counts(gateway)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        gateway = self.gateway
        started = time.perf_counter()
        record = RequestRecord(request_id(request.headers.get(REQUEST_ID)))
        # Read once: a reload swaps the config, this decision finishes on the old one.
        config = gateway.engine.components().config
        settings = config.decision or DecisionConfig()
        try:
            _guard(request, settings)
            original = _original(request)
            extra: dict[str, str] = {}
            verdict = await decide(gateway, request, original, record, extra)
            response = answer.allow(
                verdict,
                record.request_id,
                extra,
                jwt_header=config.jwt.header,
                cache_ttl=settings.cache_ttl,
                now=gateway.clock(),
            )
        except GatewayError as exc:
            record.reason = exc.reason
            if record.decision is None:
                record.decision = exc.outcome()
            response = answer.deny(exc, record.request_id)
        except Exception:
            log.exception("unhandled error in decision %s", record.request_id)
            record.reason, record.decision = "internal_error", "error"
            response = answer.deny(
                GatewayError("internal error", reason="internal_error"), record.request_id
            )
        record.status = response.status
        key = (record.route, record.decision or "error")
        self.counts[key] = self.counts.get(key, 0) + 1
        record.duration = time.perf_counter() - started
        gateway.access_log.write(request, record, decision=True)
        return response


def _guard(request: web.BaseRequest, settings: DecisionConfig) -> None:
    """Only the data plane may ask: the shared token and the peer allow-list, when set."""
    if settings.allow_from:
        try:
            peer = ipaddress.ip_address(request.remote or "")
        except ValueError:
            peer = None
        if peer is None or not any(peer in net for net in _networks(settings.allow_from)):
            raise Forbidden("this peer may not ask for decisions", reason="decision_forbidden")
    if settings.token is not None:
        sent = request.headers.get(TOKEN_HEADER, "")
        # A header that is not UTF-8 is a mismatch, not an error.
        if not hmac.compare_digest(
            sent.encode("utf-8", "surrogateescape"), settings.token.encode()
        ):
            raise Forbidden("missing or wrong decision token", reason="decision_forbidden")


@functools.lru_cache(maxsize=16)
def _networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """`decision.allow_from` parsed once per value (a reload may change it)."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def _original(request: web.BaseRequest) -> Original:
    path = request.raw_path.partition("?")[0]
    if path == AUTH_PATH:
        return from_auth(request)
    if path == EXT_AUTHZ_PREFIX or path.startswith(EXT_AUTHZ_PREFIX + "/"):
        return from_ext_authz(request)
    raise NotFound("no such decision endpoint: use /auth or /ext_authz/", reason="no_endpoint")


def decision_app(gateway: Gateway) -> web.Application:
    """The decision listener's app, served by `GatewayRunner`; the gateway's lifespan stays
    with its proxy app (set up, with or without a proxy site, by `serve`)."""
    config = gateway.config.server
    app = web.Application(
        handler_args={
            "max_field_size": config.max_field_size,
            "max_line_size": config.max_line_size,
            "logger": http_log,
        }
    )
    # The listener's own head and keep-alive timeouts, as every gateway listener has.
    app[TIMEOUTS] = Timeouts.of(gateway.config.server)
    app[ANSWER] = DecisionListener(gateway).handle
    return app
