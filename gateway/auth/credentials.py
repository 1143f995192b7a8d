"""Find the client's API key in a request, or say there is none ("not mine" is `None`).

Only the exact header names of `credentials.sources` are read. A request that
carries two different keys, repeats a key header, or sends a key that cannot be
one (control characters, spaces, absurd length) is refused before any tower
call: the gateway must never validate one value and forward another.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from aiohttp import hdrs
from multidict import CIMultiDictProxy, istr

from gateway.errors import BadRequest

X_API_KEY: Final = istr("X-API-Key")  # case-folded once, as aiohttp's `hdrs` names
SOURCE_HEADERS: Final = {"x-api-key": X_API_KEY, "authorization": hdrs.AUTHORIZATION}
# Schemes of `Authorization` that carry an API key; anything else (Basic,
# Digest, ...) is "not mine" and stays the upstream's business.
KEY_SCHEMES: Final = frozenset({"bearer", "apikey"})


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

    def extract(self, headers: CIMultiDictProxy[str]) -> str | None:
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

    def candidates(self, headers: CIMultiDictProxy[str]) -> tuple[str, ...]:
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

    def carried_key(self, source: str, value: str) -> bool:
        """Whether this header value is a key (so it must not reach the upstream)."""
        try:
            return self._read(source, value) is not None
        except BadRequest:
            return True

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
            raise BadRequest("empty API key", reason="malformed_key")
        if len(key) > self._max_length:
            raise BadRequest("API key too long", reason="malformed_key")
        if not (key.isascii() and key.isprintable()) or " " in key:
            raise BadRequest("API key has characters a key cannot have", reason="malformed_key")
        return key
