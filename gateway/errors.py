"""The one exception tree of the gateway; every denial becomes a response in one place.

    GatewayError                      status  reason id
    ├── BadRequest                    400     malformed_request, conflicting_keys,
    │                                         repeated_key, malformed_key, bad_path,
    │                                         key_in_query, bad_method
    ├── MissingKey                    401     missing_key
    ├── InvalidKey                    401     invalid_key, expired_key, revoked_key
    ├── Forbidden                     403     missing_capability, origin_not_allowed
    ├── NotFound                      404     no_route
    ├── MethodNotAllowed              405     method_not_allowed
    ├── PayloadTooLarge               413     body_too_large
    ├── ExpectationFailed             417     expectation_failed
    ├── RateLimited                   429     rate_limited, too_many_failures
    ├── UpstreamUnavailable           502     upstream_unavailable
    ├── TowerUnavailable              503     tower_unavailable
    └── UpstreamTimeout               504     upstream_timeout

An error raised with `close=True` also closes the client's connection: after a
request whose framing is in doubt, nothing more may be read from it.

`TowerFault` is not a client error: it is what a tower client raises when the
tower could not give a trustworthy answer; the identity layer turns it into a
stale identity or into `TowerUnavailable`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class GatewayError(Exception):
    """A request the gateway refuses; knows its HTTP status and fixed reason id."""

    status: ClassVar[int] = 500
    default_reason: ClassVar[str] = "internal_error"

    def __init__(
        self,
        detail: str,
        *,
        reason: str | None = None,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason or self.default_reason
        self.headers: Mapping[str, str] = headers or {}
        self.close = close


class BadRequest(GatewayError):
    status = 400
    default_reason = "malformed_request"


class MissingKey(GatewayError):
    status = 401
    default_reason = "missing_key"


class InvalidKey(GatewayError):
    status = 401
    default_reason = "invalid_key"


class Forbidden(GatewayError):
    status = 403
    default_reason = "missing_capability"


class NotFound(GatewayError):
    status = 404
    default_reason = "no_route"


class MethodNotAllowed(GatewayError):
    status = 405
    default_reason = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    default_reason = "body_too_large"


class ExpectationFailed(GatewayError):
    status = 417
    default_reason = "expectation_failed"


class RateLimited(GatewayError):
    status = 429
    default_reason = "rate_limited"


class UpstreamUnavailable(GatewayError):
    status = 502
    default_reason = "upstream_unavailable"


class TowerUnavailable(GatewayError):
    status = 503
    default_reason = "tower_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    default_reason = "upstream_timeout"


class TowerFault(Exception):
    """The tower gave no trustworthy answer. `kind` is a bounded metric label."""

    KINDS: ClassVar[frozenset[str]] = frozenset(
        {
            "timeout",
            "refused",
            "server_error",
            "tower_auth",
            "malformed",
            "redirect",
            "circuit_open",
            "error",
        }
    )

    def __init__(self, kind: str, detail: str, *, key_specific: bool = False) -> None:
        assert kind in self.KINDS, kind
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        # An answer the key a client sent may have provoked (a 4xx): it says nothing
        # about the tower's health, so it never counts towards opening the circuit.
        self.key_specific = key_specific


class ConfigError(Exception):
    """A configuration problem; `path` is the dotted key (`routes[1].upstream`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message
