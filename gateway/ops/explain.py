"""`POST /admin/explain`: what the gateway decides for a key, a method and a path, and why.

The decision is computed as the pipeline computes it (normalised path, route,
identity, capabilities, shadow mode) on one snapshot of the live components,
but nothing is forwarded, no JWT is minted and no rate-limit token is spent;
the rate limit is reported, not evaluated. A key is resolved through the normal
resolver (cache, then the tower) and is never logged or echoed: the answer
names it by its fingerprint. A fingerprint (the access log's `key` field)
explains an identity already in this process's cache without the key at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth.credentials import SOURCE_HEADERS
from gateway.auth.ratelimit import effective_limit
from gateway.auth.routes import Route, normalise_path
from gateway.errors import BadRequest, GatewayError, InvalidKey, NotFound
from gateway.tower import Identity

if TYPE_CHECKING:
    from gateway.app import Gateway

# Denials that `enforce: false` forwards (and records as would_deny): the caller's
# identity or policy, never a malformed request or an unavailable tower.
SHADOW_STATUSES: Final = frozenset({401, 403, 429})
MAX_FINGERPRINTS: Final = 100_000
_FINGERPRINT_LENGTH: Final = 16  # Fingerprinter.short(): 8 bytes in hex
_HTTP_METHOD_MAX: Final = 16


@dataclass(frozen=True, slots=True)
class ExplainQuery:
    """One `POST /admin/explain` body: a key or a fingerprint, a method and a path."""

    key: str | None
    fingerprint: str | None
    method: str
    path: str

    @classmethod
    def parse(cls, body: Any) -> ExplainQuery:
        """Validate a decoded JSON body; raises `ValueError` with what is wrong."""
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        unknown = set(body) - {"key", "fingerprint", "method", "path"}
        if unknown:
            raise ValueError(f"unknown field: {sorted(unknown)[0]}")
        key, fingerprint = body.get("key"), body.get("fingerprint")
        if (key is None) == (fingerprint is None):
            raise ValueError("give exactly one of key and fingerprint")
        if key is not None and (not isinstance(key, str) or not key):
            raise ValueError("key must be a non-empty string")
        if fingerprint is not None and (
            not isinstance(fingerprint, str)
            or len(fingerprint) != _FINGERPRINT_LENGTH
            or any(c not in "0123456789abcdef" for c in fingerprint)
        ):
            raise ValueError(f"fingerprint must be {_FINGERPRINT_LENGTH} lower-case hex digits")
        method = body.get("method", "GET")
        if (
            not isinstance(method, str)
            or not method.isalpha()
            or not method.isascii()
            or len(method) > _HTTP_METHOD_MAX
        ):
            raise ValueError("method must be an HTTP method name")
        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("path must be a non-empty string")
        return cls(key, fingerprint, method.upper(), path)


class UnknownFingerprint(Exception):
    """No identity with this fingerprint is in this process's cache."""


def _identity(identity: Identity, fingerprint: str) -> dict[str, Any]:
    return {
        "key": fingerprint,
        "key_id": identity.key_id,
        "user_id": identity.user_id,
        "role": identity.role,
        "scopes": list(identity.scopes),
        "team": identity.team,
        "expires_at": identity.expires_at,
    }


def _route(route: Route) -> dict[str, Any]:
    config = route.config
    return {
        "name": route.name,
        "path": config.path,
        "methods": list(config.methods) if config.methods is not None else None,
        "require": list(route.require),
        "auth": config.auth,
        "enforce": config.enforce,
        "upstream": config.upstream,
    }


async def explain(gateway: Gateway, query: ExplainQuery) -> dict[str, Any]:
    """The decision for `query` and its reasons; raises `UnknownFingerprint`."""
    parts = gateway.components  # one snapshot, as a request sees one
    fingerprinter = gateway.fingerprinter
    answer: dict[str, Any] = {
        "key": (
            fingerprinter.short(fingerprinter.digest(query.key))
            if query.key is not None
            else query.fingerprint
        ),
        "method": query.method,
        "path": query.path,
        "route": None,
        "identity": None,
        "role": None,
        "capabilities": None,
        "missing_capability": None,
        "rate_limit_per_minute": None,
    }

    def decide(status: int, reason: str, detail: str, route: Route | None = None) -> None:
        shadow = route is not None and not route.config.enforce and status in SHADOW_STATUSES
        decision = "allow" if status == 200 else "would_deny" if shadow else "deny"
        answer.update(status=status, reason=reason, detail=detail, decision=decision)
        answer["forwarded"] = decision != "deny"

    raw_path = query.path.partition("?")[0]
    try:
        route = parts.routes.match(normalise_path(raw_path), query.method)
    except (BadRequest, NotFound) as exc:
        decide(exc.status, exc.reason, exc.detail)
        return answer
    answer["route"] = _route(route)
    if not route.config.auth:
        decide(200, "public_route", "public route: no key needed, none forwarded")
        return answer

    if query.key is not None:
        try:
            key = parts.extractor.extract(_as_headers(parts.extractor.sources, query.key))
            if key is None:  # a key an `Authorization` header could not carry
                raise BadRequest("not a valid API key", reason="malformed_key")
            resolved = await gateway.resolver.resolve(key)
        except GatewayError as exc:
            # Only an identity denial may be shadowed: a malformed key or a tower outage
            # is refused on every route.
            shadowable = route if isinstance(exc, InvalidKey) else None
            decide(exc.status, exc.reason, exc.detail, shadowable)
            return answer
        gateway.fingerprint(resolved)  # indexed like a request's
        identity, digest = resolved.identity, resolved.digest
        answer["source"] = resolved.source
    else:
        assert query.fingerprint is not None
        found = gateway.resolver.find_fingerprint(query.fingerprint)
        cached = gateway.resolver.peek(found) if found is not None else None
        if found is None or cached is None:
            raise UnknownFingerprint(query.fingerprint)
        identity, digest = cached, found
        answer["source"] = "cache"
        if identity.expired(gateway.clock()):
            decide(401, "expired_key", "API key has expired", route)
            answer["identity"] = _identity(identity, query.fingerprint)
            return answer

    answer["identity"] = _identity(identity, fingerprinter.short(digest))
    grants = parts.mapper.grants(identity)
    answer["role"] = grants.role
    answer["capabilities"] = list(grants.caps)
    answer["rate_limit_per_minute"] = effective_limit(
        identity.rate_limit, parts.config.rate_limit.default_per_minute
    )
    missing = grants.missing(route.require)
    if missing is not None:
        answer["missing_capability"] = missing
        decide(403, "missing_capability", f"Missing required capability: {missing}", route)
    else:
        decide(200, "allowed", "allowed: the request is forwarded with a JWT")
    return answer


def _as_headers(sources: tuple[str, ...], key: str) -> CIMultiDictProxy[str]:
    """The key as the first configured source would carry it, so it is checked as a
    request's would be (length, characters) before any tower call."""
    source = sources[0]
    value = key if source == "x-api-key" else f"Bearer {key}"
    headers: Mapping[str, str] = {SOURCE_HEADERS[source]: value}
    return CIMultiDictProxy(CIMultiDict(headers))
