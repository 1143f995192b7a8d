"""A decision as the data plane reads it: the allow answer, or the proxy listener's denial.

An allow is `200`, empty, with the JWT header, `X-Request-Id`, the `RateLimit-*`
headers and a `Cache-Control` that lets the data plane reuse it for no longer
than `decision.cache_ttl`, the key's remaining life and the JWT's. A denial is
the status, JSON body and headers the proxy listener answers, with
`Cache-Control: no-store`, and the body once more in `X-Tower-Gateway-Error`:
nginx's `auth_request` passes only 401 and 403 on and turns every other status
into 500, so the generated nginx config re-emits the real status with that body.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Final

from aiohttp import hdrs, web
from multidict import CIMultiDict

from gateway.decision.engine import Verdict
from gateway.errors import GatewayError
from gateway.http.headers import REQUEST_ID

ERROR_HEADER: Final = "X-Tower-Gateway-Error"
NOSNIFF: Final = {"X-Content-Type-Options": "nosniff"}
NO_STORE: Final = "no-store"


def error_body(exc: GatewayError) -> str:
    return json.dumps({"error": exc.reason, "detail": exc.detail})


def deny(exc: GatewayError, rid: str) -> web.Response:
    body = error_body(exc)
    response = web.Response(status=exc.status, text=body, content_type="application/json")
    headers = response.headers
    headers.update(exc.headers)
    headers.update(NOSNIFF)
    headers[REQUEST_ID] = rid
    headers[hdrs.CACHE_CONTROL] = NO_STORE
    headers[ERROR_HEADER] = body
    return response


def allow(
    verdict: Verdict,
    rid: str,
    extra: Mapping[str, str],
    *,
    jwt_header: str,
    cache_ttl: float,
    now: float,
) -> web.Response:
    # One multidict built whole: a third of the cost of setting its headers one by one.
    headers = CIMultiDict(extra)
    headers.extend(NOSNIFF)
    headers[REQUEST_ID] = rid
    if verdict.token is not None:
        headers[jwt_header] = f"Bearer {verdict.token}"
    if verdict.shadow is not None:
        headers["X-Gateway-Shadow-Decision"] = verdict.shadow
    seconds = reuse_seconds(verdict, cache_ttl, now)
    if seconds > 0:
        headers[hdrs.CACHE_CONTROL] = f"private, max-age={seconds}"
        # What nginx's proxy_cache reads (it never caches a `private` answer otherwise).
        headers["X-Accel-Expires"] = str(seconds)
    else:
        headers[hdrs.CACHE_CONTROL] = NO_STORE
    return web.Response(status=200, headers=headers)


def reuse_seconds(verdict: Verdict, cache_ttl: float, now: float) -> int:
    """Whole seconds an allow may be reused: within `cache_ttl`, the key's expiry and the
    JWT's `exp`, rounded down (a shared clock second must not stretch any of them)."""
    if cache_ttl <= 0:
        return 0
    limit = cache_ttl
    if verdict.expires_at is not None:
        limit = min(limit, verdict.expires_at - now)
    if verdict.token is not None:
        limit = min(limit, token_expiry(verdict.token) - now)
    return max(0, math.floor(limit))


def token_expiry(token: str) -> float:
    """The `exp` of a JWT the gateway minted (read, not verified: it signed it); 0 when it
    cannot be read, which makes the answer uncacheable."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims["exp"]
    except (IndexError, KeyError, TypeError, ValueError, binascii.Error):
        return 0.0
    return float(exp) if isinstance(exp, int | float) else 0.0
