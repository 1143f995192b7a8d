"""The original request a data plane asks about, read from its decision request.

nginx `auth_request` sends `X-Original-Method` and `X-Original-URI` (the
generated config sets them); Traefik ForwardAuth and Caddy `forward_auth` send
`X-Forwarded-Method` and `X-Forwarded-Uri`; Envoy's HTTP ext_authz sends the
original method as its own and the original path under `/ext_authz`. The
client address is the last `X-Forwarded-For` entry: every data plane appends
the address it saw (the generated nginx config sets it alone), so whatever a
client wrote is left of it. These headers are believed only because the
listener is reachable by the data plane alone (`decision.token`,
`decision.allow_from`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from aiohttp import hdrs, web

from gateway.errors import BadRequest

EXT_AUTHZ_PREFIX: Final = "/ext_authz"
# (method header, URI header), in the order they are looked for.
_PAIRS: Final = (
    ("X-Original-Method", "X-Original-URI"),
    ("X-Forwarded-Method", "X-Forwarded-Uri"),
)
MAX_URI: Final = 8190


@dataclass(frozen=True, slots=True)
class Original:
    """The request the data plane is holding: its method, raw URI (path and query, still
    %-escaped), the client's address and whether it asks for a WebSocket upgrade."""

    method: str
    uri: str
    client: str | None
    upgrade: bool


def _single(request: web.BaseRequest, name: str) -> str | None:
    values = request.headers.getall(name, ())
    if len(values) > 1:
        raise BadRequest(f"{name} is repeated", reason="bad_original_request")
    return values[0] if values else None


def _client(request: web.BaseRequest) -> str | None:
    chain = [
        part.strip()
        for value in request.headers.getall(hdrs.X_FORWARDED_FOR, ())
        for part in value.split(",")
        if part.strip()
    ]
    return chain[-1][:64] if chain else request.remote


def _upgrade(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get(hdrs.UPGRADE)
    return upgrade is not None and upgrade.lower() == "websocket"


def _checked_uri(uri: str) -> str:
    if not uri.startswith("/"):
        # An absolute URI (`http://other/x`) or an authority: the data plane routed on
        # something else than this path, so no decision for it could be right.
        raise BadRequest("the original URI must be a path starting with /", reason="bad_path")
    if len(uri) > MAX_URI:
        raise BadRequest("the original URI is too long", reason="bad_path")
    return uri


def from_auth(request: web.BaseRequest) -> Original:
    """The original request of an `/auth` decision request; 400 when it names none, or
    names it twice (both pairs: one of them is a client's, which the data plane let
    through, and no decision could tell which)."""
    found: list[tuple[str, str]] = []
    for method_header, uri_header in _PAIRS:
        method, uri = _single(request, method_header), _single(request, uri_header)
        if method is None and uri is None:
            continue
        if not method or uri is None:
            raise BadRequest(
                f"{method_header} and {uri_header} are sent together",
                reason="bad_original_request",
            )
        found.append((method, uri))
    if len(found) != 1:
        raise BadRequest(
            "send one original request: X-Original-Method and X-Original-URI, "
            "or X-Forwarded-Method and X-Forwarded-Uri",
            reason="bad_original_request",
        )
    method, uri = found[0]
    return Original(method, _checked_uri(uri), _client(request), _upgrade(request))


def from_ext_authz(request: web.BaseRequest) -> Original:
    """The original request of an Envoy ext_authz check: its own method, the path after
    `/ext_authz` and its query."""
    uri = request.raw_path[len(EXT_AUTHZ_PREFIX) :] or "/"
    if uri.startswith("?"):
        uri = "/" + uri
    return Original(request.method, _checked_uri(uri), _client(request), _upgrade(request))
