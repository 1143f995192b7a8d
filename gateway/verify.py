"""Verify the gateway's internal JWT in a Python service behind it.

    from gateway.verify import InvalidToken, Verifier

    verifier = Verifier(
        jwks_url="http://gateway-ops:9091/.well-known/jwks.json",
        issuer="tower-gateway",
        audience="internal",
        algorithms=["RS256"],
    )
    claims = verifier.verify(token)  # or: await verifier.verify_async(token)

What it refuses, whatever the token's header says: an algorithm outside
`algorithms` (so `alg: none`, and HS256 when only public keys are configured:
the key-confusion attack of an HMAC keyed with the public key), a signing key
that does not match the algorithm, a `kid` the key set does not have, a `crit`
header, and tokens without `iss aud sub iat nbf exp jti` or outside their
validity (with `leeway` seconds of clock skew). `jku`, `x5u` and `jwk` headers
are never followed: keys come from the configuration only.

With `jwks_url` the key set is fetched on first use, kept `cache_ttl` seconds,
fetched again early when a token names an unknown `kid` (a key rotation), but
never more often than `min_refresh_interval`, and kept while a refresh fails.
Fetching follows no redirects and reads at most `max_jwks_bytes`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import httpx
import jwt

log = logging.getLogger("tower_gateway.verify")

HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS: Final = frozenset({"RS256", "ES256", "EdDSA"})
REQUIRED_CLAIMS: Final = ("iss", "aud", "sub", "iat", "nbf", "exp", "jti")
MAX_JWKS_BYTES: Final = 1024 * 1024

Fetch = Callable[[str, float, int], bytes]


class InvalidToken(Exception):
    """A token that must not be trusted; `reason` is a short fixed id for logs and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class JwksUnavailable(Exception):
    """The key set could not be fetched or read."""


def fetch_jwks(url: str, timeout: float, max_bytes: int) -> bytes:
    """GET `url` without following redirects, reading at most `max_bytes`."""
    with (
        httpx.Client(follow_redirects=False, trust_env=False, timeout=timeout) as client,
        client.stream("GET", url, headers={"Accept": "application/json"}) as response,
    ):
        if response.status_code != 200:
            raise JwksUnavailable(f"{url} answered {response.status_code}")
        body = bytearray()
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > max_bytes:
                raise JwksUnavailable(f"{url} answered more than {max_bytes} bytes")
        return bytes(body)


class Verifier:
    """Checks tokens against pinned algorithms, one issuer and one audience."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        algorithms: Iterable[str],
        jwks_url: str | None = None,
        jwks: Mapping[str, Any] | None = None,
        secret: str | bytes | None = None,
        leeway: float = 5.0,
        cache_ttl: float = 300.0,
        min_refresh_interval: float = 30.0,
        timeout: float = 5.0,
        max_jwks_bytes: int = MAX_JWKS_BYTES,
        clock: Callable[[], float] = time.time,
        fetch: Fetch = fetch_jwks,
    ) -> None:
        self.algorithms = frozenset(algorithms)
        if sum(source is not None for source in (jwks_url, jwks, secret)) != 1:
            raise ValueError("give exactly one of jwks_url, jwks or secret")
        if not self.algorithms:
            raise ValueError("algorithms must name at least one algorithm")
        allowed = HMAC_ALGORITHMS if secret is not None else PUBLIC_KEY_ALGORITHMS
        # Pinning the family to the key material is what defeats key confusion:
        # with public keys configured, no HMAC algorithm is ever accepted.
        if not self.algorithms <= allowed:
            kind = "a secret" if secret is not None else "public keys"
            raise ValueError(f"with {kind} the algorithms must be among {sorted(allowed)}")
        if secret is not None and not secret:
            raise ValueError("the secret is empty")
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self._url = jwks_url
        self._cache_ttl = cache_ttl
        self._min_refresh = min_refresh_interval
        self._timeout = timeout
        self._max_bytes = max_jwks_bytes
        self._clock = clock
        self._fetch = fetch
        self._lock = threading.Lock()
        self._keys: dict[str, Mapping[str, Any]] = {}
        self._fetched_at: float | None = None
        self._tried_at: float | None = None
        self.fetches = 0  # key set downloads attempted, for monitoring
        if jwks is not None:
            self._keys = _read_jwks(jwks)
            self._fetched_at = float("inf")  # given, never fetched

    # ------------------------------------------------------------------ verify

    def verify(self, token: str | bytes) -> dict[str, Any]:
        """The claims of a valid token; raises `InvalidToken` otherwise (may fetch keys)."""
        header = self._header(token)
        key = self._key(header, fetch=True)
        return self._decode(token, header["alg"], key)

    async def verify_async(self, token: str | bytes) -> dict[str, Any]:
        """`verify` for an event loop: a key set download runs in a worker thread."""
        header = self._header(token)
        if self._url is not None and self._fetch_due(header.get("kid")):
            await asyncio.to_thread(self._maybe_refresh, header.get("kid"))
        key = self._key(header, fetch=False)
        return self._decode(token, header["alg"], key)

    def _header(self, token: str | bytes) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("malformed", f"not a JWT ({type(exc).__name__})") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise InvalidToken("algorithm", f"algorithm {alg!r} is not accepted")
        if "crit" in header:
            raise InvalidToken("malformed", "critical header extensions are not supported")
        return header

    def _decode(self, token: str | bytes, alg: str, key: Any) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": list(REQUIRED_CLAIMS), "strict_aud": True},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("not_yet_valid", "the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("audience", "the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("issuer", "the token is from another issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken("missing_claim", f"the token has no {exc.claim!r}") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("signature", "the signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise InvalidToken("invalid", f"{type(exc).__name__}") from None
        return claims

    # ------------------------------------------------------------------ keys

    def _key(self, header: Mapping[str, Any], *, fetch: bool) -> Any:
        if self._secret is not None:
            return self._secret
        kid = header.get("kid")
        if fetch and self._url is not None and self._fetch_due(kid):
            self._maybe_refresh(kid)
        jwk = self._find(kid)
        alg = header["alg"]
        if "alg" in jwk and jwk["alg"] != alg:
            raise InvalidToken("key_mismatch", f"key {kid!r} is for {jwk['alg']}, not {alg}")
        try:
            return jwt.PyJWK(dict(jwk), algorithm=alg).key
        except jwt.PyJWTError as exc:
            raise InvalidToken("key_mismatch", f"key {kid!r} cannot verify {alg}: {exc}") from None

    def _find(self, kid: object) -> Mapping[str, Any]:
        keys = self._keys
        if kid is None and len(keys) == 1:
            return next(iter(keys.values()))
        if not isinstance(kid, str) or kid not in keys:
            raise InvalidToken("unknown_kid", f"no key {kid!r} in the key set")
        return keys[kid]

    def _fetch_due(self, kid: object) -> bool:
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at >= self._cache_ttl:
            return self._tried_at is None or now - self._tried_at >= self._min_refresh
        if isinstance(kid, str) and kid not in self._keys:
            # An unknown kid may be a rotation: look again, at a bounded rate.
            return self._tried_at is None or now - self._tried_at >= self._min_refresh
        return False

    def _maybe_refresh(self, kid: object) -> None:
        with self._lock:
            if self._fetch_due(kid):  # another thread may have just done it
                self.refresh()

    def refresh(self) -> None:
        """Download the key set now; on failure the keys already held stay in use."""
        assert self._url is not None, "refresh needs jwks_url"
        self._tried_at = self._clock()
        self.fetches += 1
        try:
            raw = self._fetch(self._url, self._timeout, self._max_bytes)
            keys = _read_jwks(json.loads(raw))
        except (JwksUnavailable, httpx.HTTPError, ValueError, RecursionError) as exc:
            log.warning("cannot refresh the JWKS from %s: %s", self._url, type(exc).__name__)
            return
        self._keys = keys
        self._fetched_at = self._tried_at


def _read_jwks(jwks: object) -> dict[str, Mapping[str, Any]]:
    """The signing keys of a JWKS document by kid; private parts are never kept."""
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        raise ValueError('a JWKS is an object with a "keys" list')
    keys: dict[str, Mapping[str, Any]] = {}
    for item in jwks["keys"]:
        if not isinstance(item, Mapping) or item.get("use", "sig") != "sig":
            continue
        if any(private in item for private in ("d", "p", "q", "k")):
            continue  # a private or symmetric key has no place in a published set
        kid = item.get("kid")
        if isinstance(kid, str) and kid:
            keys[kid] = dict(item)
        elif not keys and kid is None:
            keys[""] = dict(item)
    return keys
