"""`POST /admin/explain`: what the gateway decides for a key, a method and a path, and why.

The decision is `decide()`'s own, run dry on one snapshot of the live
components: the same path normalisation, route, key checks (shape, key
format), identity, capabilities, shadow mode and rate limit, but nothing is
forwarded, no JWT is minted, no rate-limit token or failure-throttle attempt is
spent, and no metric or audit event of a request is counted. A key is resolved
through the normal resolver (cache, then the tower) and is never logged or
echoed: the answer names it by its fingerprint. A fingerprint (the access log's
`key` field) explains an identity already in this process's cache without the
key at all. A refusal is `deny` whatever its cause: explain says whether the
request would be forwarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from multidict import CIMultiDict

from gateway.auth.decide import (
    ALLOW,
    DENY,
    PUBLIC,
    WOULD_DENY,
    Decision,
    DecisionEngine,
    OriginalRequest,
)
from gateway.auth.identity import Resolved
from gateway.auth.routes import Route
from gateway.ops.accesslog import RequestRecord
from gateway.tower import Identity

# Explain's decisions: public routes are an allow, and every refusal a deny.
EXPLAINED: Final = {ALLOW: ALLOW, PUBLIC: ALLOW, WOULD_DENY: WOULD_DENY}
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


class Explainer:
    """Answers `POST /admin/explain` with a dry run of the decision engine."""

    def __init__(self, engine: DecisionEngine) -> None:
        self._engine = engine

    async def explain(self, query: ExplainQuery) -> dict[str, Any]:
        """The decision for `query` and its reasons; raises `UnknownFingerprint`."""
        engine = self._engine
        fingerprinter = engine.fingerprinter
        credential: str | Resolved
        if query.key is not None:
            credential = query.key
            fingerprint = fingerprinter.short(fingerprinter.digest(query.key))
        else:
            assert query.fingerprint is not None
            resolver = engine.resolver
            found = resolver.find_fingerprint(query.fingerprint)
            cached = resolver.peek(found) if found is not None else None
            if found is None or cached is None:
                raise UnknownFingerprint(query.fingerprint)
            credential, fingerprint = Resolved(cached, found, "cache"), query.fingerprint
        raw_path, _, query_string = query.path.partition("?")
        original = OriginalRequest(query.method, raw_path, query_string, CIMultiDict(), None)
        record = RequestRecord("explain")
        decision = await engine.decide(original, record, credential=credential, dry_run=True)
        if isinstance(credential, Resolved) and decision.reason == "expired_key":
            # An expired identity from the cache: refused, and still shown.
            return _answer(query, fingerprint, decision, record, credential)
        return _answer(query, fingerprint, decision, record, decision.resolved)


def _answer(
    query: ExplainQuery,
    fingerprint: str,
    decision: Decision,
    record: RequestRecord,
    resolved: Resolved | None,
) -> dict[str, Any]:
    route, grants, error = decision.route, decision.grants, decision.error
    if decision.outcome == ALLOW:
        status, reason, detail = 200, "allowed", "allowed: the request is forwarded with a JWT"
    elif decision.outcome == PUBLIC:
        status, reason = 200, "public_route"
        detail = "public route: no key needed, none forwarded"
    else:
        assert error is not None
        status, reason, detail = error.status, error.reason, error.detail
    answer: dict[str, Any] = {
        "key": fingerprint,
        "method": query.method,
        "path": query.path,
        "route": _route(route) if route is not None else None,
        "identity": _identity(resolved.identity, fingerprint) if resolved is not None else None,
        "role": grants.role if grants is not None else None,
        "capabilities": list(grants.caps) if grants is not None else None,
        "missing_capability": record.missing,
        "rate_limit_per_minute": decision.per_minute if grants is not None else None,
        "status": status,
        "reason": reason,
        "detail": detail,
        # Whether it would be forwarded: an outage or a bad request is a deny here too.
        "decision": EXPLAINED.get(decision.outcome, DENY),
        "forwarded": decision.forwarded,
    }
    if resolved is not None:
        answer["source"] = resolved.source
    return answer
