"""Who sent a request, and what the upstream is told about it: the one walk of a trusted
`X-Forwarded-For` chain, for the client address and for the header passed on.

A peer inside `server.trusted_proxies` is believed about the addresses left of
it; anyone else's `X-Forwarded-For` is the client's own writing and ignored.
"""

from __future__ import annotations

import ipaddress

from aiohttp import hdrs, web
from multidict import CIMultiDict

from gateway.http.headers import REQUEST_ID

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _chain(request: web.BaseRequest) -> list[str]:
    """The addresses `X-Forwarded-For` lists, every header and comma-separated part."""
    return [
        part.strip()
        for value in request.headers.getall(hdrs.X_FORWARDED_FOR, ())
        for part in value.split(",")
    ]


def _trusted(address: str, trusted: tuple[IPNetwork, ...]) -> bool | None:
    """Whether `address` is a trusted proxy; None when it is not an address at all."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return any(ip in net for net in trusted)


def client_address(request: web.BaseRequest, trusted: tuple[IPNetwork, ...]) -> str | None:
    """Who sent the request: the peer, or, while the peer is a trusted proxy, the address
    that proxy reported: the rightmost untrusted one of `X-Forwarded-For` + peer. A value
    that is not an address ends the walk: a client can write anything left of its proxy."""
    remote = request.remote
    if not trusted or remote is None:
        return remote
    current = remote
    for candidate in [remote, *reversed(_chain(request))]:
        verdict = _trusted(candidate, trusted)
        if verdict is None:
            return current
        current = candidate
        if not verdict:
            return current
    return current


def forwarded_for(request: web.BaseRequest, trusted: tuple[IPNetwork, ...]) -> str:
    """X-Forwarded-For for the upstream: the peer's address, after the chain the peer
    reported when it is a trusted proxy (a client's own header is never passed on)."""
    remote = request.remote or ""
    if not trusted:
        return remote
    prior = ", ".join(request.headers.getall(hdrs.X_FORWARDED_FOR, ()))
    if not prior:
        return remote
    return f"{prior}, {remote}" if _trusted(remote, trusted) else remote


def add_forwarding(
    headers: CIMultiDict[str],
    request: web.BaseRequest,
    trusted: tuple[IPNetwork, ...],
    request_id: str,
    *,
    upstream_host: str,
    preserve_host: bool,
) -> None:
    """The headers the gateway sets for the upstream: X-Forwarded-For/-Proto/-Host,
    X-Request-Id and Host, in place of any the client sent."""
    host = request.host
    headers[hdrs.X_FORWARDED_FOR] = forwarded_for(request, trusted)
    headers[hdrs.X_FORWARDED_PROTO] = request.scheme
    if host:
        headers[hdrs.X_FORWARDED_HOST] = host
    headers[REQUEST_ID] = request_id
    headers[hdrs.HOST] = host if preserve_host and host else upstream_host
