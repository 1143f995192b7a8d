"""Item 11: the minted JWTs (algorithm pinned; `iss`, `aud`, `exp` always set) and
`gateway.verify.Verifier`, which a service behind the gateway uses to check them: it
refuses `alg: none`, HS256 signed with the public key (key confusion), expired tokens,
unknown kids and keys smuggled in the token's own header."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.auth.tokens import load_signing_key
from gateway.verify import InvalidToken, Verifier
from tests.conftest import JWT_SECRET, GatewayFactory, Harness
from tests.security.conftest import GOOD, BackgroundApps, add_keys

ALGORITHMS = ["RS256", "ES256", "EdDSA"]


def write_key(directory: Path, algorithm: str) -> Path:
    private: Any
    if algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{algorithm}.pem"
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"


async def minted(h: Harness) -> str:
    response = await h.client.get("/x", headers={"X-API-Key": GOOD})
    assert response.status == 200
    auth = h.upstream.seen[-1].header("authorization")
    assert auth is not None and auth.startswith("Bearer ")
    return auth.split(" ", 1)[1]


@pytest.fixture(params=ALGORITHMS)
async def signed(
    request: pytest.FixtureRequest, make_gateway: GatewayFactory, tmp_path: Path
) -> tuple[Harness, str, Path]:
    algorithm: str = request.param
    pem = write_key(tmp_path, algorithm)
    h = await make_gateway(jwt={"algorithm": algorithm, "private_key_file": str(pem)})
    add_keys(h.tower)
    return h, algorithm, pem


def jwks_url(h: Harness) -> str:
    return str(h.ops.make_url("/.well-known/jwks.json"))


def verifier_for(h: Harness, algorithm: str, **kw: Any) -> Verifier:
    return Verifier(
        jwks_url=jwks_url(h),
        issuer="tower-gateway",
        audience="internal",
        algorithms=[algorithm],
        **kw,
    )


# --------------------------------------------------------------------------- minted tokens


async def test_minted_tokens_pin_the_algorithm_and_carry_iss_aud_exp(
    signed: tuple[Harness, str, Path],
) -> None:
    h, algorithm, _ = signed
    token = await minted(h)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == algorithm and header["kid"]
    claims = await verifier_for(h, algorithm).verify_async(token)
    assert claims["iss"] == "tower-gateway" and claims["aud"] == "internal"
    assert claims["iat"] <= claims["nbf"] + 1 and claims["exp"] - claims["iat"] <= 300
    assert claims["sub"] == "u1" and claims["jti"]


async def test_hmac_tokens_verify_with_the_secret_only(gw: Harness) -> None:
    token = await minted(gw)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    verifier = Verifier(
        secret=JWT_SECRET, issuer="tower-gateway", audience="internal", algorithms=["HS256"]
    )
    assert verifier.verify(token)["sub"] == "u1"
    wrong = Verifier(
        secret="x" * 40, issuer="tower-gateway", audience="internal", algorithms=["HS256"]
    )
    with pytest.raises(InvalidToken) as refused:
        wrong.verify(token)
    assert refused.value.reason == "signature"


# --------------------------------------------------------------------------- attacks


async def test_alg_none_is_refused(signed: tuple[Harness, str, Path]) -> None:
    h, algorithm, _ = signed
    claims = jwt.decode(await minted(h), options={"verify_signature": False})
    verifier = verifier_for(h, algorithm)
    kid = jwt.get_unverified_header(await minted(h))["kid"]
    for alg in ("none", "None", "NONE", ""):
        token = unsigned({"alg": alg, "typ": "JWT", "kid": kid}, {**claims, "role": "admin"}) + "."
        with pytest.raises(InvalidToken) as refused:
            await verifier.verify_async(token)
        assert refused.value.reason == "algorithm"


async def test_hs256_signed_with_the_public_key_is_refused(
    signed: tuple[Harness, str, Path],
) -> None:
    h, algorithm, pem = signed
    token = await minted(h)
    kid = jwt.get_unverified_header(token)["kid"]
    claims = jwt.decode(token, options={"verify_signature": False})
    private = serialization.load_pem_private_key(pem.read_bytes(), password=None)
    publics = [
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        json.dumps((await (await h.ops.get("/.well-known/jwks.json")).json())["keys"][0]).encode(),
    ]
    verifier = verifier_for(h, algorithm)
    for public in publics:
        body = unsigned({"alg": "HS256", "typ": "JWT", "kid": kid}, {**claims, "role": "admin"})
        mac = hmac.new(public, body.encode(), hashlib.sha256).digest()
        with pytest.raises(InvalidToken) as refused:
            await verifier.verify_async(f"{body}.{b64(mac)}")
        assert refused.value.reason == "algorithm"
    # Nor can a verifier holding public keys be told to accept HMAC at all.
    with pytest.raises(ValueError):
        Verifier(jwks_url=jwks_url(h), issuer="i", audience="a", algorithms=[algorithm, "HS256"])
    with pytest.raises(ValueError):
        Verifier(secret=JWT_SECRET, issuer="i", audience="a", algorithms=["RS256"])
    for bad in ([], ["none"]):
        with pytest.raises(ValueError):
            Verifier(jwks_url=jwks_url(h), issuer="i", audience="a", algorithms=bad)


async def test_expired_and_future_tokens_are_refused(signed: tuple[Harness, str, Path]) -> None:
    h, algorithm, _ = signed
    token = await minted(h)
    kid = jwt.get_unverified_header(token)["kid"]
    claims = jwt.decode(token, options={"verify_signature": False})
    key = load_signing_key(h.gateway.config.jwt).key
    verifier = verifier_for(h, algorithm, leeway=5)
    now = int(time.time())
    cases = {
        "expired": {**claims, "iat": now - 700, "nbf": now - 700, "exp": now - 400},
        "not_yet_valid": {**claims, "iat": now, "nbf": now + 600, "exp": now + 900},
        "issuer": {**claims, "iss": "someone-else"},
        "audience": {**claims, "aud": "another-service"},
    }
    for reason, body in cases.items():
        forged = jwt.encode(body, key, algorithm=algorithm, headers={"kid": kid})
        with pytest.raises(InvalidToken) as refused:
            await verifier.verify_async(forged)
        assert refused.value.reason == reason
    for claim in ("exp", "iss", "aud", "sub", "jti"):
        body = {k: v for k, v in claims.items() if k != claim}
        forged = jwt.encode(body, key, algorithm=algorithm, headers={"kid": kid})
        with pytest.raises(InvalidToken) as refused:
            await verifier.verify_async(forged)
        assert refused.value.reason in {"missing_claim", "audience", "issuer"}, claim
    # The genuine token still passes: each refusal above was for what was changed.
    assert (await verifier.verify_async(token))["exp"] > now


async def test_an_expired_gateway_token_is_refused(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    pem = write_key(tmp_path, "ES256")
    past = time.time() - 3600
    h = await make_gateway(
        clock=lambda: past, jwt={"algorithm": "ES256", "private_key_file": str(pem)}
    )
    add_keys(h.tower)
    token = await minted(h)
    with pytest.raises(InvalidToken) as refused:
        await verifier_for(h, "ES256").verify_async(token)
    assert refused.value.reason == "expired"


async def test_keys_from_the_token_header_are_never_used(
    signed: tuple[Harness, str, Path], tmp_path: Path
) -> None:
    h, algorithm, _ = signed
    token = await minted(h)
    kid = jwt.get_unverified_header(token)["kid"]
    claims = jwt.decode(token, options={"verify_signature": False})
    attacker: Any = serialization.load_pem_private_key(
        write_key(tmp_path / "attacker", algorithm).read_bytes(), password=None
    )
    attacker_jwk = json.loads(jwt.get_algorithm_by_name(algorithm).to_jwk(attacker.public_key()))
    verifier = verifier_for(h, algorithm)
    for extra in (
        {"kid": kid, "jwk": attacker_jwk},
        {"kid": kid, "jku": "http://127.0.0.1:9/jwks.json"},
        {"kid": kid, "x5u": "http://127.0.0.1:9/cert.pem"},
        {"kid": "attacker", "jwk": attacker_jwk},
        {"kid": "../../../../dev/null"},
    ):
        forged = jwt.encode(
            {**claims, "role": "admin"}, attacker, algorithm=algorithm, headers=extra
        )
        with pytest.raises(InvalidToken) as refused:
            await verifier.verify_async(forged)
        assert refused.value.reason in {"signature", "unknown_kid"}
    crit = jwt.encode(claims, attacker, algorithm=algorithm, headers={"kid": kid, "crit": ["exp"]})
    with pytest.raises(InvalidToken):
        await verifier.verify_async(crit)


async def test_a_header_alg_that_does_not_fit_the_key_is_refused(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    pem = write_key(tmp_path, "RS256")
    h = await make_gateway(jwt={"algorithm": "RS256", "private_key_file": str(pem)})
    add_keys(h.tower)
    token = await minted(h)
    kid = jwt.get_unverified_header(token)["kid"]
    claims = jwt.decode(token, options={"verify_signature": False})
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(claims, other, algorithm="ES256", headers={"kid": kid})
    verifier = Verifier(
        jwks_url=jwks_url(h),
        issuer="tower-gateway",
        audience="internal",
        algorithms=["RS256", "ES256"],
    )
    with pytest.raises(InvalidToken) as refused:
        await verifier.verify_async(forged)
    assert refused.value.reason == "key_mismatch"


@pytest.mark.parametrize("token", ["", "a", "a.b", "a.b.c", "....", "eyJ.eyJ.x", "\x00"])
def test_garbage_is_refused_as_malformed(token: str) -> None:
    verifier = Verifier(secret=JWT_SECRET, issuer="i", audience="a", algorithms=["HS256"])
    with pytest.raises(InvalidToken):
        verifier.verify(token)


# --------------------------------------------------------------------------- the key set


class JwksServer:
    """Serves a key set it can be told to change; counts its downloads."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.hits = 0
        self.status = 200
        self.redirect: str | None = None
        self.padding = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/jwks.json", self._jwks)
        return app

    async def _jwks(self, _request: web.Request) -> web.Response:
        self.hits += 1
        if self.redirect:
            raise web.HTTPFound(self.redirect)
        body = {"keys": self.keys, "padding": "x" * self.padding}
        return web.json_response(body, status=self.status)


def es256_pair(kid: str) -> tuple[Any, dict[str, Any]]:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.get_algorithm_by_name("ES256").to_jwk(private.public_key()))
    return private, {**jwk, "kid": kid, "alg": "ES256", "use": "sig"}


def token_for(private: Any, kid: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": "i", "aud": "a", "sub": "u", "iat": now, "nbf": now, "exp": now + 60, "jti": "j"}
    return jwt.encode({**body, **claims}, private, algorithm="ES256", headers={"kid": kid})


async def test_the_key_set_is_cached_refreshed_on_rotation_and_rate_limited(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    old, old_jwk = es256_pair("old")
    new, new_jwk = es256_pair("new")
    server = JwksServer([old_jwk])
    url = str((await aiohttp_server(server.app(), host="127.0.0.1")).make_url("/jwks.json"))
    now = [1000.0]
    verifier = Verifier(
        jwks_url=url,
        issuer="i",
        audience="a",
        algorithms=["ES256"],
        min_refresh_interval=30,
        cache_ttl=300,
        clock=lambda: now[0],
    )
    for _ in range(50):
        assert (await verifier.verify_async(token_for(old, "old")))["sub"] == "u"
    assert server.hits == 1  # cached
    # The gateway rotates: a token with the new kid triggers one early refresh.
    server.keys = [old_jwk, new_jwk]
    now[0] += 31
    assert (await verifier.verify_async(token_for(new, "new")))["sub"] == "u"
    assert server.hits == 2
    # Unknown kids cannot make it fetch more than once per min_refresh_interval.
    for i in range(100):
        with pytest.raises(InvalidToken):
            await verifier.verify_async(token_for(new, f"bogus-{i}"))
    assert server.hits == 2
    # While the key set cannot be fetched, the keys it has stay in use.
    server.status = 500
    now[0] += 301
    assert (await verifier.verify_async(token_for(old, "old")))["sub"] == "u"
    assert server.hits == 3


@pytest.mark.parametrize("trouble", ["redirect", "oversized", "symmetric_key", "not_json"])
async def test_a_hostile_key_set_is_not_believed(
    aiohttp_server: Callable[..., Awaitable[TestServer]], trouble: str
) -> None:
    private, jwk = es256_pair("k")
    server = JwksServer([jwk])
    thief = JwksServer([jwk])
    thief_url = str((await aiohttp_server(thief.app(), host="127.0.0.1")).make_url("/jwks.json"))
    url = str((await aiohttp_server(server.app(), host="127.0.0.1")).make_url("/jwks.json"))
    if trouble == "redirect":
        server.redirect = thief_url
    elif trouble == "oversized":
        server.padding = 2 * 1024 * 1024
    elif trouble == "symmetric_key":
        server.keys = [{"kty": "oct", "kid": "k", "k": b64(b"secret"), "alg": "HS256"}]
    else:
        server.keys = ["not", "keys"]  # type: ignore[list-item]
    verifier = Verifier(jwks_url=url, issuer="i", audience="a", algorithms=["ES256"])
    with pytest.raises(InvalidToken):
        await verifier.verify_async(token_for(private, "k"))
    assert thief.hits == 0


def test_the_blocking_verifier_fetches_the_key_set_itself() -> None:
    # For a threaded service (Flask, Django): `verify` downloads the key set itself.
    private, jwk = es256_pair("k")
    server = JwksServer([jwk])
    apps = BackgroundApps()
    try:
        url = apps.serve(server.app()) + "/jwks.json"
        verifier = Verifier(jwks_url=url, issuer="i", audience="a", algorithms=["ES256"])
        for _ in range(10):
            assert verifier.verify(token_for(private, "k"))["sub"] == "u"
        assert server.hits == 1 and verifier.fetches == 1
    finally:
        apps.close()
