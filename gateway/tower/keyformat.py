"""The API key format of the embedded tower: `<prefix>_<env>_<random><checksum>`.

The random part is 32 base62 characters (about 190 bits from `secrets`); the
checksum is the CRC32 of everything before it, in 6 base62 characters, so a
mistyped or made-up key is refused without a database lookup (the scheme of
GitHub's token format).
"""

from __future__ import annotations

import re
import secrets
import string
import zlib
from typing import Final

ALPHABET: Final = string.digits + string.ascii_uppercase + string.ascii_lowercase
ENVS: Final = ("test", "live")
RANDOM_LENGTH: Final = 32
CHECKSUM_LENGTH: Final = 6
# What `display_prefix` keeps of the random part: enough to tell keys apart in
# a listing, far too little (about 24 bits) to help guess the rest.
DISPLAY_RANDOM_CHARS: Final = 4

_PREFIX: Final = re.compile(r"[a-z][a-z0-9]{0,15}")
_KEY: Final = re.compile(
    rf"(?P<head>(?P<prefix>[a-z][a-z0-9]{{0,15}})_(?P<env>test|live)_)"
    rf"(?P<random>[0-9A-Za-z]{{{RANDOM_LENGTH}}})(?P<checksum>[0-9A-Za-z]{{{CHECKSUM_LENGTH}}})"
)


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rest = divmod(number, len(ALPHABET))
        digits.append(ALPHABET[rest])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def valid_prefix(prefix: str) -> bool:
    """True for a usable key prefix: 1-16 of a-z0-9, starting with a letter."""
    return _PREFIX.fullmatch(prefix) is not None


def generate(prefix: str, env: str) -> str:
    """A fresh key for `env` ("test" or "live"); raises ValueError on a bad prefix or env."""
    if not valid_prefix(prefix):
        raise ValueError(f"key prefix must be 1-16 of a-z0-9 starting with a letter: {prefix!r}")
    if env not in ENVS:
        raise ValueError(f"env must be one of {', '.join(ENVS)}: {env!r}")
    body = f"{prefix}_{env}_" + "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_LENGTH))
    return body + _checksum(body)


def looks_valid(key: object, prefix: str) -> bool:
    """True when `key` has this prefix, a known env and a matching checksum."""
    if not isinstance(key, str):
        return False
    match = _KEY.fullmatch(key)
    if match is None or match["prefix"] != prefix:
        return False
    return _checksum(match["head"] + match["random"]) == match["checksum"]


def env_of(key: str) -> str | None:
    """The env ("test" or "live") named by a well-formed key, else None."""
    match = _KEY.fullmatch(key)
    return match["env"] if match else None


def display_prefix(key: str) -> str:
    """The start of a key that is safe to show and store: `tk_test_AbCd`."""
    match = _KEY.fullmatch(key)
    if match is None:
        raise ValueError("not a well-formed key")
    return match["head"] + match["random"][:DISPLAY_RANDOM_CHARS]
