"""Header names and which client headers may reach an upstream, computed once per config.

Names are `istr`s, as aiohttp's `hdrs`, so multidicts need not case-fold them on
every request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final
from urllib.parse import unquote

from aiohttp import hdrs
from multidict import CIMultiDict, istr

from gateway.config import INTENT_HEADERS

# The header the gateway keeps (when well formed) or assigns, on every answer and upstream request.
REQUEST_ID: Final = istr("X-Request-Id")
# Tells the upstream of a shadow route (`enforce: false`) what enforcement would have done.
SHADOW_DECISION: Final = istr("X-Gateway-Shadow-Decision")
MIN_SCRUBBED_KEY: Final = 8
# On every response the gateway makes itself.
NOSNIFF: Final = (istr("X-Content-Type-Options"), "nosniff")

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "expect",
        "host",
    }
)
# Set by the gateway, so never taken from the client (nor any `_`/`.` spelling).
GATEWAY_SET: Final = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "forwarded",
        "x-real-ip",
        "x-request-id",
    }
)
# Identity headers other proxies and frameworks trust; a client must not forge them.
IDENTITY_HEADERS: Final = frozenset(
    {
        "x-api-key",
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-forwarded-preferred-username",
        "x-forwarded-access-token",
        "x-remote-user",
        "remote-user",
        "x-user",
        "x-user-id",
        "x-user-role",
        "x-user-roles",
        "x-role",
        "x-key-id",
        "x-scopes",
        "x-team",
        "x-jwt-assertion",
        "x-internal-jwt",
    }
)
IDENTITY_PREFIXES: Final = ("x-auth-", "x-gateway-", "x-tower-")
# How many times a value is %-decoded while looking for a key in it: an upstream
# may decode a query or a cookie once, a framework behind it once more.
MAX_DECODINGS: Final = 3


def canonical(name: str) -> str:
    """Header name as a proxy on the way might read it: `X_Api.Key` -> `x-api-key`."""
    return name.lower().replace("_", "-").replace(".", "-")


class HeaderPolicy:
    """Which client headers reach the upstream; computed once per config."""

    __slots__ = ("_blocked",)

    def __init__(self, extra_blocked: Iterable[str]) -> None:
        self._blocked = frozenset(HOP_BY_HOP | GATEWAY_SET | IDENTITY_HEADERS | INTENT_HEADERS) | {
            canonical(h) for h in extra_blocked
        }

    def blocked(self, name: str) -> bool:
        low = canonical(name)
        return low in self._blocked or low.startswith(IDENTITY_PREFIXES)

    def forwardable(
        self, headers: Mapping[str, str], connection_tokens: frozenset[str]
    ) -> CIMultiDict[str]:
        out: CIMultiDict[str] = CIMultiDict()
        blocked = self._blocked
        for name, value in headers.items():
            low = name.lower()
            if low in blocked or low in connection_tokens:
                continue
            if ("_" in low or "." in low or low.startswith(IDENTITY_PREFIXES)) and self.blocked(
                low
            ):
                continue
            out.add(name, value)
        return out

    @staticmethod
    def scrub(headers: CIMultiDict[str], keys: Iterable[str]) -> None:
        """Drops every header whose value holds one of `keys`: a key sent twice, once in a
        header the gateway does not read (`Api-Key`, a cookie), still never reaches the
        upstream. Keys shorter than MIN_SCRUBBED_KEY are no real keys and are skipped, so a
        stray short value cannot strip unrelated headers."""
        needles = [key for key in keys if len(key) >= MIN_SCRUBBED_KEY]
        if not needles:
            return
        # One search over all the values first: a key is seldom sent twice. A key
        # has no NUL, so no match spans two values.
        joined = "\0".join(headers.values())
        if not holds_key(joined, needles):
            return
        kept = [(n, v) for n, v in headers.items() if not holds_key(v, needles)]
        if len(kept) != len(headers):
            headers.clear()
            headers.extend(kept)


def holds_key(text: str, keys: Iterable[str]) -> bool:
    """Whether `text` holds one of `keys`, as sent or %-encoded (any characters of it, in
    either case, up to MAX_DECODINGS times over). A key has no space, so `+` needs no
    decoding."""
    for _ in range(MAX_DECODINGS + 1):
        if any(key in text for key in keys):
            return True
        if "%" not in text:
            return False
        decoded = unquote(text)
        if decoded == text:
            return False
        text = decoded
    return False


def query_holds_key(query: str, keys: Iterable[str]) -> bool:
    """Whether a query string holds a key, under any parameter name: the upstream
    gets no copy of it (`token=`, `access_token=`, a name spelled any way)."""
    needles = [key for key in keys if len(key) >= MIN_SCRUBBED_KEY]
    return bool(needles) and holds_key(query, needles)


def forward_intent(
    headers: CIMultiDict[str], client: Mapping[str, str], allowed: frozenset[str]
) -> None:
    """Adds back the request-intent headers a route's `forward_headers` lets through."""
    for name, value in client.items():
        if canonical(name) in allowed:
            headers.add(name, value)


def connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    value = headers.get(hdrs.CONNECTION)
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def is_upgrade(headers: Mapping[str, str]) -> bool:
    """Whether a request asks to become a WebSocket."""
    upgrade = headers.get(hdrs.UPGRADE)
    return upgrade is not None and upgrade.lower() == "websocket"
