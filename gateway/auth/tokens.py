"""Mint the internal JWT the upstream verifies, reuse it while it is fresh, publish JWKS.

A token is cached per (key fingerprint, grants, audience) and reused, while the identity
it describes is unchanged, until less than a tenth of its lifetime is left, so
a cache-hit request does not sign. `exp` is never after the key's own
`expires_at`. Its `jti` names the token, not a request: every request of a key
to routes of one audience carries the same token while it is reused. Each
route's upstream gets tokens for its own `aud` (`routes[].audience`), so a
token one service captured is refused by a service of another audience.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from cachetools import LRUCache
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.auth.capabilities import Grants
from gateway.config import JwtConfig
from gateway.errors import ConfigError
from gateway.tower import Identity

REFRESH_FRACTION: Final = 0.1
# Tokens are kept for the hottest identities only: a token string is ~500
# bytes, and re-signing a cold identity's HS256 token costs ~20 µs.
MAX_CACHED_TOKENS: Final = 10_000

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class SigningKey:
    algorithm: str
    kid: str
    key: bytes | PrivateKey
    public_jwk: Mapping[str, Any] | None  # None for HMAC: nothing to publish


def load_signing_key(config: JwtConfig) -> SigningKey:
    """Read the configured key once at start-up; a bad key is a `ConfigError`."""
    if config.algorithm.startswith("HS"):
        assert config.secret is not None
        secret = config.secret.encode()
        # The kid names the key without revealing it: a short hash, not the secret.
        kid = config.kid or "hs-" + hashlib.sha256(b"kid:" + secret).hexdigest()[:16]
        return SigningKey(config.algorithm, kid, secret, None)

    assert config.private_key_file is not None
    try:
        data = Path(config.private_key_file).read_bytes()
        private = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            "jwt.private_key_file", f"not a readable PEM private key ({exc})"
        ) from None
    expected: dict[str, type] = {
        "RS256": rsa.RSAPrivateKey,
        "ES256": ec.EllipticCurvePrivateKey,
        "EdDSA": ed25519.Ed25519PrivateKey,
    }
    if not isinstance(private, expected[config.algorithm]):
        raise ConfigError("jwt.private_key_file", f"key type does not match {config.algorithm}")
    if isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name != "secp256r1":
        raise ConfigError("jwt.private_key_file", "ES256 needs a P-256 key")
    algo = jwt.get_algorithm_by_name(config.algorithm)
    public_jwk: dict[str, Any] = json.loads(algo.to_jwk(private.public_key()))
    thumb_src = json.dumps({k: public_jwk[k] for k in sorted(public_jwk)}, separators=(",", ":"))
    kid = config.kid or hashlib.sha256(thumb_src.encode()).hexdigest()[:16]
    public_jwk.update({"kid": kid, "alg": config.algorithm, "use": "sig"})
    return SigningKey(config.algorithm, kid, private, public_jwk)  # type: ignore[arg-type]


def same_key(a: SigningKey, b: SigningKey) -> bool:
    """True when two loaded keys sign alike (algorithm, kid and secret material)."""
    return (a.algorithm, a.kid) == (b.algorithm, b.kid) and private_material(
        a
    ) == private_material(b)


def private_material(key: SigningKey) -> bytes:
    """The signing key's secret part as bytes (the HMAC secret, or the private key's PKCS#8
    DER): material to derive other secrets from, which nothing published reveals."""
    if isinstance(key.key, bytes):
        return key.key
    return key.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


_Claimed = tuple[str, str, tuple[str, ...], float | None, str | None]


def _claimed(identity: Identity) -> _Claimed:
    """The identity fields a token carries (role and caps come with the grants)."""
    return (identity.user_id, identity.key_id, identity.scopes, identity.expires_at, identity.team)


class TokenMinter:
    """Signs internal JWTs and remembers them until they need refreshing."""

    __slots__ = ("_cache", "_clock", "_config", "_key", "_retired", "minted", "reused")

    def __init__(
        self,
        config: JwtConfig,
        key: SigningKey,
        *,
        clock: Callable[[], float] = time.time,
        max_cached: int = MAX_CACHED_TOKENS,
    ) -> None:
        self._config = config
        self._key = key
        self._clock = clock
        # token, refresh time, what it claims, and the identity it was signed for
        self._cache: LRUCache[
            tuple[bytes, Grants, str], tuple[str, float, _Claimed, Identity]
        ] = LRUCache(max_cached)
        # Public keys replaced by `rotate`, published until the tokens they signed expire.
        self._retired: list[tuple[Mapping[str, Any], float]] = []
        self.minted = 0
        self.reused = 0

    @property
    def kid(self) -> str:
        return self._key.kid

    @property
    def key(self) -> SigningKey:
        return self._key

    def jwks(self) -> dict[str, list[Mapping[str, Any]]]:
        now = self._clock()
        self._retired = [(jwk, until) for jwk, until in self._retired if now < until]
        keys = [self._key.public_jwk] if self._key.public_jwk else []
        keys += [jwk for jwk, _ in self._retired if jwk["kid"] != self._key.kid]
        return {"keys": keys}

    def rotate(self, key: SigningKey, config: JwtConfig) -> None:
        """Sign with `key` (and `config`) from now on. The old public key stays in the JWKS
        for one token lifetime, so upstreams still verify the tokens it signed; tokens minted
        with it are not reused."""
        old, lifetime = self._key, self._config.ttl
        if old.public_jwk is not None and old.kid != key.kid:
            self._retired.append((old.public_jwk, self._clock() + lifetime))
        self._key, self._config = key, config
        self.forget()

    def token_for(
        self, cache_key: bytes, identity: Identity, grants: Grants, audience: str | None = None
    ) -> str:
        """The JWT for an identity, its grants and an audience (None: `jwt.audience`)."""
        if audience is None:
            audience = self._config.audience
        now = self._clock()
        # Grants compare by identity and are memoised per (role, scopes) by the
        # mapper: a new mapping (a reload) yields new grants and so a new token.
        # The slot holds the grants itself, so a freed object's id is never reused.
        slot = (cache_key, grants, audience)
        try:
            cached = LRUCache.__getitem__(self._cache, slot)
        except KeyError:
            cached = None
        # Reused only while the identity still says what the token says: a
        # fresh tower answer (a shortened expiry, a new team) gets a new token.
        # The same identity object says the same (identities are immutable).
        if (
            cached is not None
            and now < cached[1]
            and (cached[3] is identity or cached[2] == _claimed(identity))
        ):
            self.reused += 1
            return cached[0]
        token, exp, iat = self._sign(identity, grants, now, audience)
        refresh_at = exp - (exp - iat) * REFRESH_FRACTION
        self._cache[slot] = (token, refresh_at, _claimed(identity), identity)
        self.minted += 1
        return token

    def forget(self, cache_keys: set[bytes] | None = None) -> None:
        """Drop cached tokens (all, or those of some keys): revocation, key rotation."""
        if cache_keys is None:
            self._cache.clear()
            return
        for slot in [s for s in self._cache if s[0] in cache_keys]:
            self._cache.pop(slot, None)

    def _sign(
        self, identity: Identity, grants: Grants, now: float, audience: str
    ) -> tuple[str, float, float]:
        iat = int(now)
        exp = iat + int(self._config.ttl)
        if identity.expires_at is not None:
            exp = min(exp, int(identity.expires_at))
        claims: dict[str, Any] = {
            "iss": self._config.issuer,
            "aud": audience,
            "sub": identity.user_id,
            "iat": iat,
            "nbf": iat,
            "exp": exp,
            "jti": uuid.uuid4().hex,
            "role": grants.role,
            "caps": list(grants.claimed),
            "scopes": list(identity.scopes),
            "key_id": identity.key_id,
        }
        if identity.team is not None:
            claims["team"] = identity.team
        token = jwt.encode(
            claims, self._key.key, algorithm=self._key.algorithm, headers={"kid": self._key.kid}
        )
        return token, float(exp), float(iat)
