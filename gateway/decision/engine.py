"""The one call from decision mode into the gateway's authorization pipeline.

`decide` takes the steps the proxy listener takes for a request, on the original
request a data plane describes: method checks, path normalisation, a key in the
query, route and method matching, WebSocket origin, credentials, identity,
capabilities, policy, rate limit (counted once per decision), failure throttle,
audit and the auth metrics, through the same `Gateway` methods. It is the only
place in `gateway.decision` that knows how the pipeline is put together.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import hdrs, web
from multidict import CIMultiDict

from gateway.accesslog import RequestRecord
from gateway.app import SHADOW_DECISION, Gateway, _has_query_key
from gateway.clientguard import check_method
from gateway.decision.original import Original
from gateway.errors import BadRequest, Forbidden, GatewayError
from gateway.explain import SHADOW_STATUSES
from gateway.routes import normalise_path
from gateway.websocket import _origin


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
    parts = gateway.components
    record.client = original.client
    raw_path, _, query = original.uri.partition("?")
    record.method, record.path = original.method, raw_path
    check_method(original.method)
    path = normalise_path(raw_path)
    if query and _has_query_key(query):
        raise BadRequest(
            "API keys are not accepted in the URL; send X-API-Key", reason="key_in_query"
        )
    route = parts.routes.match(path, original.method)
    record.route = route.name
    if original.upgrade:
        if not route.config.websocket:
            raise BadRequest(
                "WebSocket upgrades are not accepted on this route", reason="websocket_refused"
            )
        _check_origin(request, parts.config.websocket.allowed_origins)
    if not route.config.auth:
        record.decision, record.reason = "public", "public_route"
        return Verdict()
    shadow = not route.config.enforce
    noted: CIMultiDict[str] = CIMultiDict()
    try:
        key = gateway._key(request, record, parts, shadow=shadow)
        authorization = await gateway.authorize(
            key, route, record, response_headers, parts=parts, shadow=shadow
        )
    except GatewayError as exc:
        gateway.metrics.count_auth(exc.reason)
        if not (shadow and exc.status in SHADOW_STATUSES):
            raise
        gateway._would_deny(route, record, exc, noted)
        return Verdict(shadow=noted.get(SHADOW_DECISION))
    denied = authorization.would_deny
    gateway.metrics.count_auth("success" if denied is None else denied.reason)
    if denied is not None:
        gateway._would_deny(route, record, denied, noted)
    return Verdict(
        authorization.token,
        authorization.resolved.identity.expires_at,
        noted.get(SHADOW_DECISION),
    )


def _check_origin(request: web.BaseRequest, allowed: tuple[str, ...] | None) -> None:
    """`websocket.allowed_origins`, as the proxy listener applies it to an upgrade."""
    if allowed is None:
        return
    origins = request.headers.getall(hdrs.ORIGIN, [])
    if not origins:
        return
    if len(origins) > 1 or _origin(origins[0]) not in {_origin(o) for o in allowed}:
        raise Forbidden("Origin not allowed", reason="origin_not_allowed")
