"""Spans exported over OTLP/HTTP with the OpenTelemetry SDK (`tracing.otlp_endpoint`).

The gateway's own `TraceContext` (gateway.tracing) stays the source of the ids it sends;
the SDK records spans under it and exports them in batches from its own thread, so a
slow or absent collector never costs a request anything. Each export's outcome is
counted in `tower_gateway_trace_spans_total{outcome="exported"|"failed"}`, and a failing
collector is logged at most once a minute (the SDK's own per-batch errors are silenced).

Spans: `request` (server: route, decision, reason id, the key's fingerprint, never the
key), and under it `identity lookup`, `tower validate`, `redis shared cache` and
`upstream` (client spans for calls to other services). Sampling: a client's sampled flag
decides for the trace it continues; a new trace is recorded with `tracing.sample_ratio`
(on its trace id, as the SDK's ratio sampler does). An unsampled request makes no SDK call
at all: it carries no recorder, so its child spans are the no-op.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from types import TracebackType
from typing import Final

from opentelemetry import trace as otel
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from prometheus_client import CollectorRegistry, Counter

from gateway.config import TracingConfig
from gateway.tracing import CURRENT, SpanHandle, TraceContext

log = logging.getLogger("tower_gateway.otlp")

WARN_INTERVAL: Final = 60.0
MAX_PATH: Final = 256


class _CountingExporter(SpanExporter):
    """The OTLP exporter, with each batch's outcome counted and failures logged sparingly."""

    def __init__(self, inner: SpanExporter, spans: Counter) -> None:
        self._inner = inner
        self._exported = spans.labels("exported")
        self._failed = spans.labels("failed")
        self._warned_at = -WARN_INTERVAL

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:  # the exporter's own bug must not end the export thread
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._exported.inc(len(spans))
            return result
        self._failed.inc(len(spans))
        now = time.monotonic()
        if now - self._warned_at >= WARN_INTERVAL:
            self._warned_at = now
            log.warning("OTLP collector unreachable or refusing: %d spans dropped", len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _span_context(trace: TraceContext, *, remote: bool) -> otel.SpanContext:
    span_id = trace.parent_id if remote else trace.span_id
    assert span_id is not None
    return otel.SpanContext(
        int(trace.trace_id, 16),
        int(span_id, 16),
        is_remote=remote,
        trace_flags=otel.TraceFlags(int(trace.flags, 16)),
    )


def _continued(trace: TraceContext, span: otel.Span, recorder: OtlpSpans) -> TraceContext:
    """`trace`, with `span` as its current span."""
    context = span.get_span_context()
    return replace(
        trace,
        trace_id=f"{context.trace_id:032x}",
        span_id=f"{context.span_id:016x}",
        flags=f"{int(context.trace_flags):02x}",
        recorder=recorder,
    )


class _Scope:
    """One child span, current (in gateway.tracing.CURRENT) while the scope is open."""

    __slots__ = ("_kind", "_name", "_parent", "_recorder", "_span", "_token", "trace")

    def __init__(self, recorder: OtlpSpans, parent: TraceContext, name: str, kind: otel.SpanKind):
        self._recorder, self._parent, self._name, self._kind = recorder, parent, name, kind
        self.trace = parent

    def __enter__(self) -> SpanHandle:
        parent = otel.set_span_in_context(
            otel.NonRecordingSpan(_span_context(self._parent, remote=False))
        )
        self._span = self._recorder.tracer.start_span(self._name, parent, self._kind)
        self.trace = _continued(self._parent, self._span, self._recorder)
        self._token = CURRENT.set(self.trace)
        return self

    def set(self, name: str, value: str | int | float | bool) -> None:
        self._span.set_attribute(name, value)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        CURRENT.reset(self._token)
        if exc is not None:
            self._span.set_status(otel.Status(otel.StatusCode.ERROR, type(exc).__name__))
            reason = getattr(exc, "reason", None) or getattr(exc, "kind", None)
            if isinstance(reason, str):
                self._span.set_attribute("tower_gateway.reason", reason)
        self._span.end()


class OtlpSpans:
    """A `SpanRecorder` exporting to one OTLP/HTTP endpoint."""

    def __init__(self, config: TracingConfig, registry: CollectorRegistry) -> None:
        assert config.otlp_endpoint is not None
        spans = Counter(
            "tower_gateway_trace_spans",
            "Spans handed to the OTLP collector, by outcome: exported, failed (dropped)",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("exported", "failed"):
            spans.labels(outcome)
        # One warning a minute from us instead of one error per batch from the SDK.
        logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)
        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=config.timeout)
        self._processor = BatchSpanProcessor(
            _CountingExporter(exporter, spans),
            schedule_delay_millis=config.export_interval * 1000,
            export_timeout_millis=config.timeout * 1000,
        )
        self._provider = TracerProvider(
            sampler=ALWAYS_ON,  # `request` samples; everything below a recorded span is
            resource=Resource.create({"service.name": config.service_name}),
            shutdown_on_exit=False,
        )
        self._provider.add_span_processor(self._processor)
        self.tracer = self._provider.get_tracer("tower_gateway")
        self._bound = round(config.sample_ratio * 2**64)
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ the request span

    def request(self, trace: TraceContext, method: str) -> tuple[TraceContext, otel.Span | None]:
        """The request's span (the client's span its parent, if it sent one), and the trace
        context that names it; no span for a trace that is not sampled."""
        if trace.parent_id is not None:
            sampled = trace.sampled  # the client decided for its trace
        else:
            # As the SDK's TraceIdRatioBased: the trace id's low 64 bits against the ratio.
            sampled = int(trace.trace_id[16:], 16) < self._bound
        if not sampled:
            # Decided before any SDK call: an unrecorded request costs what tracing off does,
            # and the calls it makes are told it is not sampled.
            return (trace if trace.parent_id is not None else replace(trace, flags="00")), None
        parent = None
        if trace.parent_id is not None:
            remote = otel.NonRecordingSpan(_span_context(trace, remote=True))
            parent = otel.set_span_in_context(remote)
        span = self.tracer.start_span(
            f"{method} request",
            parent,
            otel.SpanKind.SERVER,
            attributes={"http.request.method": method},
        )
        return _continued(trace, span, self), span

    @staticmethod
    def finish(
        span: otel.Span,
        *,
        method: str | None,
        route: str,
        status: int,
        decision: str | None,
        reason: str | None,
        fingerprint: str | None,
        request_id: str,
        path: str | None,
    ) -> None:
        if span.is_recording():
            span.update_name(f"{method} {route}")
            attributes: dict[str, str | int] = {
                "http.route": route,
                "http.response.status_code": status,
                "tower_gateway.request_id": request_id,
            }
            if path is not None:
                attributes["url.path"] = path[:MAX_PATH]
            if decision is not None:
                attributes["tower_gateway.decision"] = decision
            if reason is not None:
                attributes["tower_gateway.reason"] = reason
            if fingerprint is not None:
                attributes["tower_gateway.key_fingerprint"] = fingerprint
            span.set_attributes(attributes)
            if status >= 500:
                span.set_status(otel.Status(otel.StatusCode.ERROR, str(status)))
        span.end()

    # ------------------------------------------------------------------ SpanRecorder

    def child(self, parent: TraceContext, name: str, *, client: bool) -> _Scope:
        kind = otel.SpanKind.CLIENT if client else otel.SpanKind.INTERNAL
        return _Scope(self, parent, name, kind)

    # ------------------------------------------------------------------ lifecycle

    def flush(self, timeout: float = 5.0) -> bool:
        return self._processor.force_flush(int(timeout * 1000))

    def shutdown(self) -> None:
        """Export what is queued (bounded by `tracing.timeout`), then stop. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._provider.shutdown()
