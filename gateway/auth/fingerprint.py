"""Keyed fingerprints of API keys: cache keys, log fingerprints, rate-limit buckets, and the
secrets derived from the one the gateway is given."""

from __future__ import annotations

import hashlib
import hmac


class Fingerprinter:
    """Keyed hash of API keys: cache keys, log fingerprints, rate-limit buckets.

    BLAKE2b in its keyed mode (a MAC by design, RFC 7693), 32 bytes: a quarter
    of HMAC-SHA256's cost, and it runs on every request. The keyed state is
    built once and copied per key.
    """

    __slots__ = ("_keyed",)

    def __init__(self, secret: bytes) -> None:
        self._keyed = hashlib.blake2b(key=secret[:64], digest_size=32, person=b"tg-key-fp")

    def digest(self, api_key: str) -> bytes:
        h = self._keyed.copy()
        h.update(api_key.encode())
        return h.digest()

    @staticmethod
    def short(digest: bytes) -> str:
        """A printable fingerprint: enough to correlate, useless to attack."""
        return digest[:8].hex()


def derive_secret(material: bytes, purpose: str) -> bytes:
    return hmac.digest(material, b"tower-gateway/" + purpose.encode(), hashlib.sha256)
