"""The one call from decision mode into the decision engine (`gateway.auth.decide`).

`decide` hands the engine the original request a data plane describes, exactly
as the proxy listener hands it a request it received: the same method check,
path normalisation and route match (`DecisionEngine.match`), the same
`decide()` (credentials, identity, capabilities, policy, rate limit counted once
per decision, failure throttle, audit, auth metrics), and for a WebSocket
upgrade the handshake's checks (the route takes WebSockets, the Origin is
allowed). It is the only place in `gateway.decision` that knows the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import hdrs, web

from gateway.app import Gateway
from gateway.auth.clientguard import check_method
from gateway.auth.decide import WOULD_DENY, OriginalRequest
from gateway.decision.original import Original
from gateway.errors import BadRequest, Forbidden
from gateway.ops.accesslog import RequestRecord
from gateway.websocket.upgrade import origin


@dataclass(frozen=True, slots=True)
class Verdict:
    """A request that may pass: its JWT (None on a public route, or on a shadow route that
    found no identity), the key's expiry, and the shadow-mode note for the upstream."""

    token: str | None = None
    expires_at: float | None = None
    shadow: str | None = None


async def decide(
    gateway: Gateway,
    request: web.BaseRequest,
    original: Original,
    record: RequestRecord,
    response_headers: dict[str, str],
) -> Verdict:
    """The proxy listener's decision for `original`; credentials are read from `request`
    (the data plane passes the client's headers on). Raises the `GatewayError` the proxy
    listener would answer with; fills `record` and `response_headers` (RateLimit-*)."""
    engine = gateway.engine
    parts = engine.components()
    raw_path, _, query = original.uri.partition("?")
    asked = OriginalRequest(
        original.method, raw_path, query, request.headers, original.client, original.upgrade
    )
    record.client, record.method, record.path = original.client, original.method, raw_path
    check_method(original.method)
    path, route = engine.match(asked, parts)
    record.route = route.name
    if original.upgrade:
        if not route.config.websocket:
            raise BadRequest(
                "WebSocket upgrades are not accepted on this route", reason="websocket_refused"
            )
        _check_origin(request, parts.config.websocket.allowed_origins)
    decision = await engine.decide(asked, record, parts=parts, route=route, path=path)
    if not decision.forwarded:
        assert decision.error is not None
        raise decision.error
    if decision.headers:
        response_headers.update(decision.headers)
    shadow = (
        f"deny; reason={decision.error.reason}"
        if decision.outcome == WOULD_DENY and decision.error is not None
        else None
    )
    resolved = decision.resolved
    return Verdict(
        decision.token, resolved.identity.expires_at if resolved is not None else None, shadow
    )


def _check_origin(request: web.BaseRequest, allowed: tuple[str, ...] | None) -> None:
    """`websocket.allowed_origins`, as the WebSocket handshake applies it."""
    if allowed is None:
        return
    origins = request.headers.getall(hdrs.ORIGIN, [])
    if not origins:
        return
    if len(origins) > 1 or origin(origins[0]) not in {origin(o) for o in allowed}:
        raise Forbidden("Origin not allowed", reason="origin_not_allowed")
