"""The proxy listener's one handler: framing checks, `decide()`, then forward or relay.

Errors become responses in exactly one place, `ProxyListener.handle`; the
decision itself (and its classification) is `gateway.auth.decide`'s.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from gateway.auth.clientguard import check_request
from gateway.auth.components import Components
from gateway.auth.decide import DecisionEngine, OriginalRequest
from gateway.auth.routes import Route
from gateway.errors import GatewayError
from gateway.http.answers import error_response, request_id
from gateway.http.forwarded import add_forwarding, client_address
from gateway.http.headers import REQUEST_ID, connection_tokens, forward_intent, is_upgrade
from gateway.ops.accesslog import AccessLog, RequestRecord
from gateway.ops.metrics import Metrics
from gateway.proxy.forwarder import Forwarder
from gateway.tower.usage import UsageRecorder
from gateway.tracing import CURRENT as CURRENT_TRACE
from gateway.tracing import TraceContext, continue_trace, span

if TYPE_CHECKING:
    from gateway.ops.otlp import OtlpSpans

log = logging.getLogger("tower_gateway")


class _RedactMalformed(logging.Filter):
    """aiohttp logs a request it cannot parse with the offending bytes, which may hold a
    key (`X-API-Key: <key>\x01`): keep the fact and the peer, drop the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg, record.args = (
                "malformed HTTP request from %s (%s)",
                (peer, type(exc).__name__),
            )
            record.exc_info, record.exc_text = None, None
        return True


# The HTTP server's own log (parse errors, broken connections) for the proxy listener.
http_log: Final = logging.getLogger("tower_gateway.http")
http_log.addFilter(_RedactMalformed())


class Upgrades(Protocol):
    """Takes over a WebSocket upgrade on a `websocket: true` route (`gateway.websocket`)."""

    async def handle(
        self,
        request: web.BaseRequest,
        original: OriginalRequest,
        route: Route,
        path: str,
        query: str,
        headers: CIMultiDict[str],
        record: RequestRecord,
        parts: Components,
    ) -> web.StreamResponse: ...


class ProxyListener:
    """Answers every request of the proxy listener (`handle`)."""

    def __init__(
        self,
        *,
        components: Callable[[], Components],
        engine: DecisionEngine,
        forwarder: Forwarder,
        metrics: Metrics,
        access_log: AccessLog,
    ) -> None:
        self._components = components
        self._engine = engine
        self._forwarder = forwarder
        self._metrics = metrics
        self.access_log = access_log  # replaced by the composition root when its log is
        self.websockets: Upgrades | None = None
        self.usage: UsageRecorder | None = None  # with tower.usage_report
        self.spans: OtlpSpans | None = None  # set with tracing.otlp_endpoint

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        trace = continue_trace(request.headers)
        spans, request_span = self.spans, None
        if spans is not None:
            trace, request_span = spans.request(trace, request.method)
        record = RequestRecord(request_id(request.headers.get(REQUEST_ID)), trace_id=trace.trace_id)
        metrics = self._metrics
        metrics.in_flight += 1
        traced = CURRENT_TRACE.set(trace)  # read by the tower client, in the single-flight task
        try:
            response = await self._pipeline(request, record, trace)
        except GatewayError as exc:
            record.reason = exc.reason
            if record.decision is None:
                record.decision = exc.outcome()
            response = error_response(exc, record.request_id)
            if hdrs.EXPECT in request.headers and not request.content.is_eof():
                # Refused before `100 Continue`: the client may send its body or
                # not, so nothing more on this connection can be told apart from
                # it. Answered, then closed (not left waiting for that body).
                response.force_close()
                with contextlib.suppress(ConnectionError):
                    await response.prepare(request)
                    await response.write_eof()
                request.protocol.force_close()
        except Exception:
            log.exception("unhandled error in request %s", record.request_id)
            record.reason, record.decision = "internal_error", "error"
            response = error_response(
                GatewayError("internal error", reason="internal_error"), record.request_id
            )
        finally:
            metrics.in_flight -= 1
            CURRENT_TRACE.reset(traced)
        record.status = response.status
        metrics.count_request(record.route, response.status)
        record.duration = time.perf_counter() - started
        self.access_log.write(request, record)
        usage = self.usage
        if usage is not None and record.key_id is not None:
            usage.record(record.key_id, response.status)
        if request_span is not None and spans is not None:
            spans.finish(
                request_span,
                method=record.method or request.method,
                route=record.route,
                status=record.status,
                decision=record.decision,
                reason=record.reason,
                fingerprint=record.fingerprint,
                request_id=record.request_id,
                path=record.path,
            )
        return response

    async def _pipeline(
        self, request: web.BaseRequest, record: RequestRecord, trace: TraceContext
    ) -> web.StreamResponse:
        # Read once: a reload swaps the components, and this request finishes on these.
        parts = self._components()
        raw_path, _, query = request.raw_path.partition("?")
        headers_in = request.headers
        original = OriginalRequest(
            request.method,
            raw_path,
            query,
            headers_in,
            client_address(request, parts.trusted_proxies),
        )
        # Logged as sent (still %-escaped): what the client asked for, not a decoding of it.
        record.client, record.method, record.path = original.client, original.method, raw_path
        check_request(request)
        engine = self._engine
        path, route = engine.match(original, parts)
        record.route = route.name
        self._forwarder.check_length(request)

        headers = parts.headers.forwardable(headers_in, connection_tokens(headers_in))
        if route.forward:
            forward_intent(headers, headers_in, route.forward)
        parts.headers.scrub(headers, parts.extractor.candidates(headers_in))
        trace.inject(headers)
        if route.config.websocket and is_upgrade(headers_in) and self.websockets is not None:
            original.upgrade = True
            return await self.websockets.handle(
                request, original, route, path, query, headers, record, parts
            )
        decision = await engine.decide(original, record, parts=parts, route=route, path=path)
        if not decision.forwarded:
            assert decision.error is not None
            raise decision.error
        decision.upstream_headers(headers, parts.jwt_header)
        add_forwarding(
            headers,
            request,
            parts.trusted_proxies,
            record.request_id,
            upstream_host=route.upstream_host,
            preserve_host=route.config.preserve_host,
        )
        response_headers: dict[str, str] = {REQUEST_ID: record.request_id}
        if decision.headers:
            response_headers.update(decision.headers)
        upstream_started = time.perf_counter()
        with span("upstream", client=True) as upstream:
            if upstream is not None:
                upstream.trace.inject(headers)  # the upstream's parent: this span
            response = await self._forwarder.forward(
                request, route, path, query, headers, response_headers
            )
        self._metrics.observe_upstream(route.name, time.perf_counter() - upstream_started)
        return response
