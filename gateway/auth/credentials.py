"""Find the client's API key in a request, or say there is none ("not mine" is `None`).

Only the exact header names of `credentials.sources` are read. A request that
carries two different keys, repeats a key header, or sends a key that cannot be
one (control characters, spaces, absurd length) is refused before any tower
call: the gateway must never validate one value and forward another.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import unquote_plus

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy, istr

from gateway.errors import BadRequest, MalformedKey

X_API_KEY: Final = istr("X-API-Key")  # case-folded once, as aiohttp's `hdrs` names
SOURCE_HEADERS: Final = {"x-api-key": X_API_KEY, "authorization": hdrs.AUTHORIZATION}
# Schemes of `Authorization` that carry an API key; anything else (Basic,
# Digest, ...) is "not mine" and stays the upstream's business.
KEY_SCHEMES: Final = frozenset({"bearer", "apikey"})
# Query parameter names that carry a key, compared after decoding and without
# separators, so `api%5Fkey`, `API-KEY` and `api.key` are all caught.
QUERY_KEY_PARAMS: Final = frozenset({"apikey", "xapikey"})
_NAME_NOISE: Final = re.compile(r"[^a-z0-9]")


def has_query_key(query: str) -> bool:
    """Whether a query string names a parameter that carries an API key."""
    # `;` separates pairs too for some frameworks, so it is a separator here.
    for pair in re.split(r"[&;]", query):
        name = _NAME_NOISE.sub("", unquote_plus(pair.split("=", 1)[0]).lower())
        if name in QUERY_KEY_PARAMS:
            return True
    return False


class CredentialExtractor:
    """Reads keys from the configured sources, in precedence order."""

    __slots__ = ("_headers", "_max_length", "sources")

    def __init__(self, sources: Iterable[str], *, max_length: int = 512) -> None:
        self.sources: tuple[str, ...] = tuple(sources)
        self._headers: tuple[tuple[str, str], ...] = tuple(
            (source, SOURCE_HEADERS[source]) for source in self.sources
        )
        self._max_length = max_length

    @property
    def header_names(self) -> tuple[str, ...]:
        return tuple(header for _, header in self._headers)

    def describe(self) -> str:
        parts = []
        for source, header in self._headers:
            parts.append(f"{header}: <key>" if source == "x-api-key" else f"{header}: Bearer <key>")
        return " or ".join(parts)

    def extract(self, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> str | None:
        """The one key the request carries, `None` when it carries none."""
        found: str | None = None
        for source, header in self._headers:
            values = headers.getall(header, ())
            if not values:
                continue
            if len(values) > 1:
                raise BadRequest(f"repeated {header} header", reason="repeated_key")
            key = self._read(source, values[0])
            if key is None:
                continue
            if found is not None and key != found:
                raise BadRequest(
                    "the request carries two different keys", reason="conflicting_keys"
                )
            found = key
        return found

    def candidates(self, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> tuple[str, ...]:
        """Every value the sources hold that would be read as a key, unchecked: what must
        never reach the upstream, whether or not the request is authenticated."""
        found: list[str] = []
        for source, header in self._headers:
            for value in headers.getall(header, ()):
                if source == "authorization":
                    scheme, _, value = value.strip().partition(" ")
                    if scheme.lower() not in KEY_SCHEMES:
                        continue
                if value.strip():
                    found.append(value.strip())
        return tuple(found)

    def check(self, key: str) -> str:
        """A key that came some other way than a header (explain), checked as one would be;
        raises `MalformedKey`."""
        checked = self._read("x-api-key", key)
        assert checked is not None  # `x-api-key` has no scheme to be "not mine"
        return checked

    def _read(self, source: str, value: str) -> str | None:
        if source == "authorization":
            scheme, _, rest = value.strip().partition(" ")
            if scheme.lower() not in KEY_SCHEMES:
                return None
            value = rest
        # Printable ASCII without space: every real key format fits, and nothing
        # that could split a header or a log line does.
        key = value.strip()
        if not key:
            raise MalformedKey("empty API key")
        if len(key) > self._max_length:
            raise MalformedKey("API key too long")
        if not (key.isascii() and key.isprintable()) or " " in key:
            raise MalformedKey("API key has characters a key cannot have")
        return key
