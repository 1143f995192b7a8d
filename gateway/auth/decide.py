"""`decide()`: may this request pass, as whom, with which JWT. The one place that says so.

    OriginalRequest ──match──> route ──> credential ──> identity (cache, tower)
        ──> capabilities ──> policy ──> rate limit ──> JWT ──> Decision

Every way in calls it: the proxy listener, the WebSocket handshake and its
first-message auth, `explain` (as a dry run), and a decision listener for
someone else's proxy. Their input is an `OriginalRequest`, the request as the
client sent it (method, path, query, headers, address), whoever received it.

The `Decision` carries everything the caller needs to answer, so no caller
classifies anything itself: the outcome (`allow`, `public`, `deny`,
`would_deny`, `error`), the reason id, the status, the headers to add, and,
from its error, the WebSocket close code and the words for the client. The
outcome of a refusal is the error's own (`GatewayError.outcome`).

A dry run (`explain`) goes the same way but spends nothing: no failure-throttle
attempt, no rate-limit token (the bucket is only read), no JWT minted, no audit
event and no metric. The identity is still resolved through the cache, as a
request would resolve it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth import constraints as key_constraints
from gateway.auth.capabilities import Grants
from gateway.auth.clientguard import FailureThrottle, key_shape_ok
from gateway.auth.components import Components
from gateway.auth.credentials import has_query_key
from gateway.auth.fingerprint import Fingerprinter
from gateway.auth.identity import IdentityResolver, Resolved
from gateway.auth.quota import QuotaCounter, QuotaDecision
from gateway.auth.ratelimit import RateLimiter, effective_limit
from gateway.auth.routes import Route, normalise_path
from gateway.auth.tokens import TokenMinter
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    InvalidKey,
    MissingKey,
    RateLimited,
)
from gateway.http.headers import SHADOW_DECISION, query_holds_key
from gateway.ops.accesslog import RequestRecord
from gateway.ops.audit import AuditLog
from gateway.ops.metrics import Metrics
from gateway.tower.constraints import Quota
from gateway.tracing import span

ALLOW: Final = "allow"
PUBLIC: Final = "public"
DENY: Final = "deny"
WOULD_DENY: Final = "would_deny"
ERROR: Final = "error"
FORWARDED: Final = frozenset({ALLOW, PUBLIC, WOULD_DENY})
PUBLIC_ROUTE: Final = "public_route"
WS_NORMAL: Final = 1000


# Built per request, so not `frozen`: a frozen dataclass's __init__ pays an
# object.__setattr__ per field. Neither is changed once built.
@dataclass(slots=True)
class OriginalRequest:
    """The request a decision is about, as its client sent it, whoever received it."""

    method: str
    raw_path: str  # as sent, still %-escaped, without the query
    query: str
    headers: CIMultiDictProxy[str] | CIMultiDict[str]
    client: str | None  # the client's address (after the trusted X-Forwarded-For walk)
    # A WebSocket upgrade: enforced even on a shadow route, since nothing can
    # take back an open socket that a logged would_deny let through.
    upgrade: bool = False


@dataclass(slots=True)
class Decision:
    """What `decide()` found: enough for any caller to answer without deciding anything."""

    outcome: str  # allow | public | deny | would_deny | error
    reason: str  # the reason id; on an allow, where the identity came from (tower, hit, ...)
    status: int  # 200, or the refusal's (on a would_deny, what enforcement would answer)
    route: Route | None = None
    path: str | None = None  # the normalised path, once it was one
    # Headers for the client's answer: `RateLimit-*` where a limit applies, or
    # the error's own (`WWW-Authenticate`, `Retry-After`).
    headers: Mapping[str, str] | None = None
    # The refusal (deny, error), or what enforcement would have refused (would_deny).
    error: GatewayError | None = None
    resolved: Resolved | None = None
    grants: Grants | None = None
    token: str | None = None  # the JWT for the upstream; None when public, denied or a dry run
    per_minute: float | None = None  # the key's rate limit, when it has one
    quota: QuotaDecision | None = None  # the key's quota, when it has one

    @property
    def forwarded(self) -> bool:
        return self.outcome in FORWARDED

    @property
    def close_code(self) -> int:
        """The WebSocket close code of a refusal that comes after the 101."""
        return WS_NORMAL if self.error is None else self.error.close_code

    def upstream_headers(self, headers: CIMultiDict[str], jwt_header: str) -> None:
        """Adds what the upstream is told: the JWT, and on a shadow route what enforcement
        would have done."""
        if self.outcome == WOULD_DENY and self.error is not None:
            headers[SHADOW_DECISION] = f"deny; reason={self.error.reason}"
        if self.token is not None:
            headers[jwt_header] = f"Bearer {self.token}"


def _key_in_query() -> BadRequest:
    return BadRequest("API keys are not accepted in the URL; send X-API-Key", reason="key_in_query")


class DecisionEngine:
    """Holds the long-lived parts a decision uses; `components()` is the live config snapshot."""

    def __init__(
        self,
        *,
        components: Callable[[], Components],
        resolver: IdentityResolver,
        minter: TokenMinter,
        fingerprinter: Fingerprinter,
        failures: FailureThrottle,
        metrics: Metrics,
        audit: AuditLog,
        clock: Callable[[], float],
    ) -> None:
        self.components = components
        self.resolver = resolver
        self.minter = minter
        self.fingerprinter = fingerprinter
        self.failures = failures
        self.metrics = metrics
        self.audit = audit  # replaced by the composition root when its audit log is
        self.clock = clock
        self.limiter: RateLimiter | None = None  # set once the gateway has started
        self.quotas: QuotaCounter | None = None  # likewise

    # ------------------------------------------------------------------ the way in

    @staticmethod
    def match(request: OriginalRequest, parts: Components) -> tuple[str, Route]:
        """The normalised path and the route; raises a `GatewayError` (400, 404, 405)."""
        path = normalise_path(request.raw_path)
        query = request.query
        if query and has_query_key(query):
            raise _key_in_query()
        route = parts.routes.match(path, request.method)
        # The key's value under any parameter name: the upstream gets no copy of it.
        if query and query_holds_key(query, parts.extractor.candidates(request.headers)):
            raise _key_in_query()
        return path, route

    @staticmethod
    def key(request: OriginalRequest, parts: Components) -> str | None:
        """The key the request's headers carry; None when they carry none."""
        return parts.extractor.extract(request.headers)

    async def decide(
        self,
        request: OriginalRequest,
        record: RequestRecord,
        *,
        parts: Components | None = None,
        route: Route | None = None,
        path: str | None = None,
        credential: str | Resolved | None = None,
        dry_run: bool = False,
    ) -> Decision:
        """The decision for `request`; fills `record` for the access log.

        `route` and `path`: already matched by the caller (`match`). `credential`: a key
        from somewhere other than the headers (a WebSocket auth message, explain), or an
        identity already resolved (explain by fingerprint); None reads the headers.
        """
        parts = parts if parts is not None else self.components()
        if route is None:
            record.client, record.method, record.path = (
                request.client,
                request.method,
                request.raw_path,
            )
            try:
                path, route = self.match(request, parts)
            except GatewayError as exc:
                record.decision, record.reason = exc.outcome(), exc.reason
                return Decision(
                    exc.outcome(), exc.reason, exc.status, headers=exc.headers, error=exc
                )
        record.route = route.name
        if not route.config.auth:
            record.decision, record.reason = PUBLIC, PUBLIC_ROUTE
            return Decision(PUBLIC, PUBLIC_ROUTE, 200, route, path)
        shadow = not route.config.enforce and not request.upgrade
        # Identity -> grants -> policy -> rate limit -> JWT, in this one coroutine: it
        # runs for every request, and only a cache miss awaits another one.
        quota: QuotaDecision | None = None
        try:
            with span("identity lookup") as lookup:
                key, resolved = self._cached(request, parts, credential)
                if resolved is None:
                    assert key is not None
                    resolved = await self._resolve(key, record, parts, dry_run)
                if lookup is not None:
                    lookup.set("tower_gateway.cache", resolved.source)
            identity = resolved.identity
            record.identify(self.fingerprinter.short(resolved.digest), identity)
            grants = parts.mapper.grants(identity)
            record.role = grants.role
            default_limit = parts.config.rate_limit.default_per_minute
            per_minute = (
                effective_limit(identity.rate_limit, default_limit)
                if identity.rate_limit is not None or default_limit > 0
                else None
            )
            would_deny: GatewayError | None = None
            limits = identity.constraints
            if limits.restricted:
                try:
                    key_constraints.check(
                        limits, request.client, request.headers.get(hdrs.ORIGIN)
                    )
                except GatewayError as refused:
                    if (
                        limits.malformed is not None
                        and not dry_run
                        and key_constraints.report_malformed(resolved, record.fingerprint)
                    ):
                        self.metrics.malformed_constraints.inc()
                    if not shadow or limits.malformed is not None:
                        raise
                    would_deny = refused
            missing = grants.missing(route.require)
            if missing is not None:
                record.missing = missing
                would_deny = Forbidden(f"Missing required capability: {missing}")
                if not shadow:
                    raise would_deny
            headers: Mapping[str, str] | None = None
            limiter = self.limiter
            if limiter is not None and per_minute is not None:
                bucket = (
                    resolved.digest.hex()
                    if limits.scope == "key"
                    else key_constraints.bucket(resolved)
                )
                limited = await (limiter.peek if dry_run else limiter.hit)(bucket, per_minute)
                headers = limited.headers()
                if not limited.allowed:
                    denial = RateLimited("Rate limit exceeded", headers=headers)
                    if not shadow:
                        raise denial
                    would_deny = would_deny or denial
            if limits.quota is not None and self.quotas is not None:
                quota, headers = await self._quota(resolved, limits.quota, headers, dry_run)
                if not quota.allowed:
                    denial = RateLimited(
                        f"Quota exceeded: {quota.limit} requests per {quota.period}",
                        reason="quota_exceeded",
                        headers=headers,
                    )
                    if not shadow:
                        raise denial
                    would_deny = would_deny or denial
        except GatewayError as exc:
            known = record.role is not None  # refused by policy: who it was is known
            return self.refused(
                exc,
                record,
                route,
                path,
                shadow=shadow,
                dry_run=dry_run,
                resolved=resolved if known else None,
                grants=grants if known else None,
                per_minute=per_minute if known else None,
                quota=quota,
            )
        record.decision, record.reason = ALLOW, resolved.source
        token = (
            None
            if dry_run
            else self.minter.token_for(resolved.digest, identity, grants, route.audience)
        )
        if would_deny is None:
            if not dry_run:
                self.metrics.count_auth("success")
                self.audit.auth(record, decision=ALLOW, reason=None)
            return Decision(
                ALLOW, resolved.source, 200, route, path, headers, None, resolved, grants, token,
                per_minute, quota,
            )  # fmt: skip
        if not dry_run:
            self.metrics.count_auth(would_deny.reason)
            self.audit.auth(record, decision=WOULD_DENY, reason=would_deny.reason)
            self.metrics.would_deny.labels(route.name, would_deny.reason).inc()
        record.decision, record.reason = WOULD_DENY, would_deny.reason
        return Decision(
            WOULD_DENY, would_deny.reason, would_deny.status, route, path, headers, would_deny,
            resolved, grants, token, per_minute, quota,
        )  # fmt: skip

    def refused(
        self,
        exc: GatewayError,
        record: RequestRecord,
        route: Route | None,
        path: str | None = None,
        *,
        shadow: bool = False,
        dry_run: bool = False,
        resolved: Resolved | None = None,
        grants: Grants | None = None,
        per_minute: float | None = None,
        quota: QuotaDecision | None = None,
    ) -> Decision:
        """The decision for a refused authentication (also one the caller refused before
        `decide` could look, as a malformed WebSocket auth message): counted and audited."""
        outcome = exc.outcome(shadow=shadow)
        if not dry_run:
            self.metrics.count_auth(exc.reason)
            self.audit.auth(record, decision=outcome, reason=exc.reason)
            if outcome == WOULD_DENY and route is not None:
                self.metrics.would_deny.labels(route.name, exc.reason).inc()
            elif isinstance(exc, RateLimited) and exc.reason == "rate_limited":
                self.metrics.rate_limited.inc()
        record.decision, record.reason = outcome, exc.reason
        if outcome == WOULD_DENY:
            # Shadow mode without an identity: forwarded, but with no JWT at all.
            return Decision(outcome, exc.reason, exc.status, route, path, error=exc)
        return Decision(
            outcome,
            exc.reason,
            exc.status,
            route,
            path,
            headers=exc.headers,
            error=exc,
            resolved=resolved,
            grants=grants,
            per_minute=per_minute,
            quota=quota,
        )

    async def _quota(
        self,
        resolved: Resolved,
        quota: Quota,
        headers: Mapping[str, str] | None,
        dry_run: bool,
    ) -> tuple[QuotaDecision, Mapping[str, str]]:
        """Counts the request against the quota of the key (or of its user or team, by its
        scope); the quota's headers added to the rate limit's."""
        counter = self.quotas
        assert counter is not None
        bucket = key_constraints.bucket(resolved)
        used = await (counter.peek if dry_run else counter.hit)(bucket, quota)
        merged = dict(headers) if headers else {}
        merged.update(used.headers())
        return used, merged

    # ------------------------------------------------------------------ identity

    def _cached(
        self, request: OriginalRequest, parts: Components, credential: str | Resolved | None
    ) -> tuple[str | None, Resolved | None]:
        """The key, and its identity when the cache has it fresh (no tower call, no throttle);
        raises `MissingKey`, `MalformedKey`, `BadRequest` or `InvalidKey` (an expired one)."""
        if isinstance(credential, Resolved):  # an identity from the cache (explain)
            if credential.identity.expired(self.clock()):
                raise InvalidKey("API key has expired", reason="expired_key")
            return None, credential
        extractor = parts.extractor
        if credential is None:
            key = extractor.extract(request.headers)
        else:
            key = extractor.check(credential)
        if key is None:
            raise MissingKey(
                f"No API key: send {extractor.describe()}",
                headers={hdrs.WWW_AUTHENTICATE: parts.www_authenticate},
            )
        # A fresh cached identity cannot be a guessed key: only lookups that may
        # reach the tower (or a cached refusal) go through the throttle.
        return key, self.resolver.fresh_hit(key)

    async def _resolve(
        self, key: str, record: RequestRecord, parts: Components, dry_run: bool
    ) -> Resolved:
        """Who `key` belongs to, from the cache or the tower, under the failure throttle;
        raises `InvalidKey`, `RateLimited` (too many failures) or `TowerUnavailable`."""
        guard = parts.config.credentials
        per_minute = 0.0 if dry_run else guard.failed_auth_per_minute
        with self.failures.attempt(record.client, per_minute):
            try:
                if not key_shape_ok(key, guard.key_format):
                    # Not a key the tower could have issued: refused without asking it.
                    raise InvalidKey("Invalid API key", reason="invalid_key")
                return await self.resolver.resolve(key)
            except InvalidKey as exc:
                exc.headers = {hdrs.WWW_AUTHENTICATE: parts.www_authenticate}
                raise
