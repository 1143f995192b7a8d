"""The one exception tree of the gateway; every denial becomes a response in one place.

    GatewayError                      status  WS close  reason id
    ├── BadRequest                    400     1011      malformed_request, conflicting_keys,
    │   │                                               repeated_key, bad_path,
    │   │                                               key_in_query, bad_method
    │   └── MalformedKey              400     4401      malformed_key
    ├── MissingKey                    401     4401      missing_key
    ├── InvalidKey                    401     4401      invalid_key, expired_key, revoked_key
    ├── Forbidden                     403     4403      missing_capability, origin_not_allowed
    ├── NotFound                      404     1011      no_route
    ├── MethodNotAllowed              405     1011      method_not_allowed
    ├── PayloadTooLarge               413     1011      body_too_large
    ├── ExpectationFailed             417     1011      expectation_failed
    ├── RateLimited                   429     4429      rate_limited, too_many_failures
    ├── UpstreamUnavailable           502     1014      upstream_unavailable
    ├── TowerUnavailable              503     1013      tower_unavailable
    └── UpstreamTimeout               504     1014      upstream_timeout

Each error also knows its outcome (`outcome()`): `deny` for what the client
sent or may not do, `error` when the gateway or what it depends on failed, and
`would_deny` for a denial of the caller's identity or policy (401, 403, 429) on
a shadow route, which forwards it anyway. The WS close code is what a WebSocket
whose 101 is already out gets instead of the status, with `client_message` in
an error frame before it.

An error raised with `close=True` also closes the client's connection: after a
request whose framing is in doubt, nothing more may be read from it.

`TowerFault` is not a client error: it is what a tower client raises when the
tower could not give a trustworthy answer; the identity layer turns it into a
stale identity or into `TowerUnavailable`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

# Denials that `enforce: false` forwards (and records as would_deny): the caller's
# identity or policy, never a malformed request or an unavailable tower.
SHADOW_STATUSES: Final = frozenset({401, 403, 429})

# WebSocket close codes (RFC 6455 7.4.1, and the 4xxx range the gateway uses
# like the HTTP statuses they mirror).
WS_INTERNAL_ERROR: Final = 1011
WS_TRY_AGAIN_LATER: Final = 1013
WS_BAD_GATEWAY: Final = 1014
WS_UNAUTHORIZED: Final = 4401
WS_FORBIDDEN: Final = 4403
WS_RATE_LIMITED: Final = 4429


class GatewayError(Exception):
    """A request the gateway refuses; knows its HTTP status and fixed reason id."""

    status: ClassVar[int] = 500
    default_reason: ClassVar[str] = "internal_error"
    close_code: ClassVar[int] = WS_INTERNAL_ERROR

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

    def outcome(self, *, shadow: bool = False) -> str:
        """`deny`, `error`, or `would_deny` when a shadow route forwards it anyway."""
        if shadow and self.status in SHADOW_STATUSES:
            return "would_deny"
        return "error" if self.status >= 500 else "deny"

    @property
    def client_message(self) -> str:
        """What a WebSocket client is told in its error frame."""
        return self.detail

    @property
    def close_reason(self) -> str:
        """The reason in the WebSocket close frame."""
        return self.detail


class BadRequest(GatewayError):
    status = 400
    default_reason = "malformed_request"


class MalformedKey(BadRequest):
    """A value where a key goes that cannot be a key: refused without asking the tower."""

    default_reason = "malformed_key"
    close_code = WS_UNAUTHORIZED

    @property
    def client_message(self) -> str:
        return "Invalid API key"


class MissingKey(GatewayError):
    status = 401
    default_reason = "missing_key"
    close_code = WS_UNAUTHORIZED


class InvalidKey(GatewayError):
    status = 401
    default_reason = "invalid_key"
    close_code = WS_UNAUTHORIZED

    @property
    def client_message(self) -> str:
        return "Invalid API key"


class Forbidden(GatewayError):
    status = 403
    default_reason = "missing_capability"
    close_code = WS_FORBIDDEN


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
    close_code = WS_RATE_LIMITED


class UpstreamUnavailable(GatewayError):
    status = 502
    default_reason = "upstream_unavailable"
    close_code = WS_BAD_GATEWAY


class TowerUnavailable(GatewayError):
    status = 503
    default_reason = "tower_unavailable"
    close_code = WS_TRY_AGAIN_LATER

    @property
    def client_message(self) -> str:
        return "Service unavailable"

    @property
    def close_reason(self) -> str:
        return "Service unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    default_reason = "upstream_timeout"
    close_code = WS_BAD_GATEWAY


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
