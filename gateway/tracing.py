"""W3C Trace Context (https://www.w3.org/TR/trace-context/): a request's trace, continued.

The gateway is one hop of a distributed trace. It reads the client's `traceparent`
(and `tracestate`), or starts a trace when there is none or it is malformed, takes a span
id of its own, and sends `traceparent: 00-<trace id>-<its span id>-<flags>` on the calls it
makes for the request: the tower validation and the upstream request or WebSocket
handshake. A malformed header is never forwarded: it is replaced, and its `tracestate`
dropped with it. The context travels in a `ContextVar`, so the tower client, many calls
down and in the single-flight task a request starts, reads it without new parameters.

With `tracing.otlp_endpoint` set, the context also carries a `SpanRecorder`
(`gateway.ops.otlp`): `span(name)` then records a child span of the current one and makes it
current, so the calls made inside it name it as their parent. Without a recorder, `span`
returns one shared no-op context manager: tracing off costs a `ContextVar` read.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol

from multidict import istr

TRACEPARENT: Final = istr("traceparent")
TRACESTATE: Final = istr("tracestate")

# version-traceid-parentid-flags, lowercase hex only (the spec refuses uppercase).
_PARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
# tracestate: at most 32 members of `key=value`; a longer or odder header is dropped whole.
MAX_TRACESTATE: Final = 512
MAX_MEMBERS: Final = 32
_MEMBER: Final = re.compile(
    r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
SAMPLED: Final = "01"


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A request's place in its trace: the trace, the gateway's span, and the caller's."""

    trace_id: str
    span_id: str  # this gateway's span for the request: the parent of every call it makes
    flags: str
    parent_id: str | None = None  # the client's span; None when the gateway began the trace
    state: str | None = None  # the client's tracestate, passed on unchanged
    recorder: SpanRecorder | None = None  # records this trace's spans; None: none are

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    @property
    def sampled(self) -> bool:
        return int(self.flags, 16) & 1 == 1

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {TRACEPARENT: self.traceparent}
        if self.state:
            out[TRACESTATE] = self.state
        return out

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Replace whatever trace headers `headers` hold (the client's) with this hop's."""
        for name in (TRACEPARENT, TRACESTATE):
            while name in headers:
                del headers[name]
        headers.update(self.headers())


def new_span_id() -> str:
    # Not secrets: ids must be unique, not unguessable, and this runs on every request.
    return f"{random.getrandbits(64) or 1:016x}"


def new_trace_id() -> str:
    return f"{random.getrandbits(128) or 1:032x}"


def parse_traceparent(value: str) -> tuple[str, str, str] | None:
    """(trace id, parent id, flags) of a valid header value, else None."""
    match = _PARENT.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    end = match.end()
    if version == "00" and end != len(value):
        return None
    if end != len(value) and value[end] != "-":  # a later version may only append fields
        return None
    return trace_id, parent_id, flags


def parse_tracestate(values: list[str]) -> str | None:
    """The tracestate to pass on: the header lines joined, or None if any member is bad."""
    joined = ",".join(values)
    if not joined or len(joined) > MAX_TRACESTATE:
        return None
    members = [m.strip(" \t") for m in joined.split(",")]
    members = [m for m in members if m]
    if not members or len(members) > MAX_MEMBERS:
        return None
    if not all(_MEMBER.fullmatch(m) for m in members):
        return None
    if len({m.split("=", 1)[0] for m in members}) != len(members):
        return None
    return ",".join(members)


def continue_trace(headers: Mapping[str, str]) -> TraceContext:
    """The request's trace context: the client's, continued, or a new trace."""
    getall = getattr(headers, "getall", None)
    parents: list[str] = getall(TRACEPARENT, []) if getall is not None else []
    if not parents and TRACEPARENT in headers:
        parents = [headers[TRACEPARENT]]
    parsed = parse_traceparent(parents[0].strip(" \t")) if len(parents) == 1 else None
    if parsed is None:
        return TraceContext(new_trace_id(), new_span_id(), SAMPLED)
    trace_id, parent_id, flags = parsed
    states: list[str] = getall(TRACESTATE, []) if getall is not None else []
    return TraceContext(trace_id, new_span_id(), flags, parent_id, parse_tracestate(states))


CURRENT: Final[ContextVar[TraceContext | None]] = ContextVar("tower_gateway_trace", default=None)


class SpanHandle(Protocol):
    """A recorded span, open: attributes may still be added."""

    trace: TraceContext  # the context whose span_id is this span's: the parent of calls in it

    def set(self, name: str, value: str | int | float | bool) -> None: ...


class SpanScope(Protocol):
    def __enter__(self) -> SpanHandle | None: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class SpanRecorder(Protocol):
    def child(self, parent: TraceContext, name: str, *, client: bool) -> SpanScope:
        """A scope recording one span under `parent`, current while it is open."""
        ...


class _NoSpan:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_exc: object) -> None:
        return None


NO_SPAN: Final[SpanScope] = _NoSpan()


def span(name: str, *, client: bool = False) -> SpanScope:
    """A child span of the current one (`client`: a call to another service), or a no-op."""
    trace = CURRENT.get()
    if trace is None or trace.recorder is None:
        return NO_SPAN
    return trace.recorder.child(trace, name, client=client)


def outgoing(headers: Mapping[str, str]) -> Mapping[str, str]:
    """`headers` plus the current request's trace headers (for a call made on its behalf)."""
    trace = CURRENT.get()
    if trace is None:
        return headers
    return {**headers, **trace.headers()}
