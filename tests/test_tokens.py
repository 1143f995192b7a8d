"""The internal JWT: claims, lifetime, reuse, every algorithm, and JWKS."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.auth.tokens import load_signing_key
from gateway.config import JwtConfig
from gateway.errors import ConfigError
from tests.conftest import JWT_SECRET, GatewayFactory, Harness

GOOD = {"X-API-Key": "good-key-1"}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def token_seen(h: Harness, header: str = "authorization") -> str:
    value = h.upstream.seen[-1].header(header)
    assert value is not None and value.startswith("Bearer ")
    return value.removeprefix("Bearer ")


def decode_hs(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token,
        JWT_SECRET,
        algorithms=["HS256"],
        audience="internal",
        issuer="tower-gateway",
        options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
    )
    return claims


def write_key(tmp_path: Path, algorithm: str) -> Path:
    private: Any
    if algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "ES384-key":
        private = ec.generate_private_key(ec.SECP384R1())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / f"{algorithm}.pem"
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


# --------------------------------------------------------------------------- claims


async def test_claims(gw: Harness) -> None:
    before = int(time.time())
    response = await gw.client.get("/tools/run", headers=GOOD)
    assert response.status == 200
    token = token_seen(gw)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    assert header["kid"] == gw.gateway.minter.kid and header["kid"]
    claims = decode_hs(token)
    assert claims["iss"] == "tower-gateway"
    assert claims["aud"] == "internal"
    assert claims["sub"] == "u1"
    assert before <= claims["iat"] <= time.time()
    assert claims["nbf"] == claims["iat"]
    assert claims["exp"] == claims["iat"] + 300
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    assert claims["role"] == "operator"
    assert claims["caps"] == sorted(claims["caps"]) == ["execute:*", "tools:execute"]
    assert claims["scopes"] == ["tools:execute"]
    assert claims["key_id"] == "k1"
    assert claims["team"] == "blue"
    assert JWT_SECRET not in token


async def test_no_team_claim_without_a_team(gw: Harness) -> None:
    assert (await gw.client.get("/x", headers={"X-API-Key": "admin-key-1"})).status == 200
    claims = decode_hs(token_seen(gw))
    assert "team" not in claims
    assert claims["role"] == "admin" and claims["caps"] == ["*"] and claims["scopes"] == []


async def test_caps_are_sorted(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(capabilities={"scopes": {"s:*": ["z:1", "a:1", "m:*"]}})
    h.tower.add("k", key_id="k1", user_id="u1", role="observer", scopes=["s:y", "b", "s:x"])
    assert (await h.client.get("/x", headers={"X-API-Key": "k"})).status == 200
    claims = decode_hs(token_seen(h))
    assert claims["caps"] == ["a:1", "b", "m:*", "s:x", "s:y", "z:1"]
    assert claims["scopes"] == ["b", "s:x", "s:y"]


async def test_exp_never_after_the_key_expiry(gw: Harness) -> None:
    expires_at = time.time() + 100.7
    gw.tower.keys["good-key-1"]["expires_at"] = expires_at
    assert (await gw.client.get("/x", headers=GOOD)).status == 200
    claims = decode_hs(token_seen(gw))
    assert claims["exp"] <= expires_at
    assert claims["exp"] >= expires_at - 1


async def test_custom_header_claims_and_issuer(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(
        jwt={"header": "X-Internal-JWT", "issuer": "gw-test", "audience": "svc", "ttl": 60}
    )
    h.tower.add("k", key_id="k1", user_id="u1", role="operator")
    response = await h.client.get(
        "/x", headers={"Authorization": "Bearer k", "X-Internal-JWT": "Bearer forged"}
    )
    assert response.status == 200
    seen = h.upstream.seen[-1]
    assert seen.header("authorization") is None  # it carried the key
    assert len(seen.headers["x-internal-jwt"]) == 1
    token = token_seen(h, "x-internal-jwt")
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="svc", issuer="gw-test")
    assert claims["exp"] - claims["iat"] == 60


# --------------------------------------------------------------------------- reuse


async def test_token_is_reused_until_a_tenth_of_its_life_is_left(
    make_gateway: GatewayFactory,
) -> None:
    clock = Clock()
    # No identity refresh ahead of the cache ttl (300 s): only the token's life is at play.
    h = await make_gateway(clock=clock, cache={"refresh_ahead": 0})
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    first = token_seen(h)
    clock.advance(100)
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    assert token_seen(h) == first
    clock.advance(169)  # 269 s of 300: 31 s left, more than a tenth
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    assert token_seen(h) == first
    clock.advance(2)  # 271 s: 29 s left
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    second = token_seen(h)
    assert second != first
    assert jwt.decode(second, options={"verify_signature": False})["iat"] == int(clock.now)
    assert (h.gateway.minter.minted, h.gateway.minter.reused) == (2, 2)
    assert h.tower.calls == ["good-key-1"]  # only the token was renewed


async def test_short_lived_key_token_refreshes_by_its_own_lifetime(
    make_gateway: GatewayFactory,
) -> None:
    clock = Clock()
    h = await make_gateway(clock=clock)
    h.tower.add(
        "good-key-1", key_id="k1", user_id="u1", role="operator", expires_at=int(clock.now) + 100
    )
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    first = token_seen(h)
    claims = jwt.decode(first, options={"verify_signature": False})
    lifetime = claims["exp"] - claims["iat"]
    assert lifetime <= 100
    clock.now = claims["iat"] + lifetime * 0.85
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    assert token_seen(h) == first
    clock.now = claims["iat"] + lifetime * 0.95
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    assert token_seen(h) != first


async def test_different_keys_get_different_tokens(gw: Harness) -> None:
    gw.tower.add(
        "good-key-2",
        key_id="k7",
        user_id="u1",
        role="operator",
        scopes=["tools:execute"],
        team="blue",
    )
    await gw.client.get("/x", headers=GOOD)
    first = token_seen(gw)
    await gw.client.get("/x", headers={"X-API-Key": "good-key-2"})
    second = token_seen(gw)
    assert first != second
    assert decode_hs(second)["key_id"] == "k7"


# --------------------------------------------------------------------------- algorithms


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
async def test_asymmetric_algorithms_sign_and_publish(
    make_gateway: GatewayFactory, tmp_path: Path, algorithm: str
) -> None:
    pem = write_key(tmp_path, algorithm)
    h = await make_gateway(jwt={"algorithm": algorithm, "private_key_file": str(pem)})
    h.tower.add("k", key_id="k1", user_id="u1", role="operator", team="red")
    assert (await h.client.get("/x", headers={"X-API-Key": "k"})).status == 200
    token = token_seen(h)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == algorithm and header["kid"]

    response = await h.ops.get("/.well-known/jwks.json")
    assert response.status == 200
    jwks = await response.json()
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    assert "d" not in jwk  # public only
    public = jwt.PyJWK(jwk, algorithm=algorithm)
    claims = jwt.decode(
        token, public.key, algorithms=[algorithm], audience="internal", issuer="tower-gateway"
    )
    assert claims["sub"] == "u1" and claims["team"] == "red"
    # A token signed by another key of the same type does not verify.
    other = serialization.load_pem_private_key(
        write_key(tmp_path / "other", algorithm).read_bytes(), password=None
    )
    forged = jwt.encode(claims, other, algorithm=algorithm, headers={"kid": header["kid"]})
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, public.key, algorithms=[algorithm], audience="internal")


async def test_hmac_publishes_no_keys(gw: Harness) -> None:
    response = await gw.ops.get("/.well-known/jwks.json")
    assert response.status == 200
    body = await response.json()
    assert body == {"keys": []}
    assert JWT_SECRET not in json.dumps(body)


def test_key_of_the_wrong_type_is_a_config_error(tmp_path: Path) -> None:
    ed = write_key(tmp_path, "EdDSA")
    with pytest.raises(ConfigError) as info:
        load_signing_key(JwtConfig(algorithm="RS256", private_key_file=str(ed)))
    assert info.value.path == "jwt.private_key_file"
    p384 = write_key(tmp_path, "ES384-key")
    with pytest.raises(ConfigError):
        load_signing_key(JwtConfig(algorithm="ES256", private_key_file=str(p384)))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(ConfigError):
        load_signing_key(JwtConfig(algorithm="ES256", private_key_file=str(garbage)))


def test_kid_is_stable_and_configurable(tmp_path: Path) -> None:
    pem = write_key(tmp_path, "ES256")
    a = load_signing_key(JwtConfig(algorithm="ES256", private_key_file=str(pem)))
    b = load_signing_key(JwtConfig(algorithm="ES256", private_key_file=str(pem)))
    assert a.kid == b.kid
    assert a.public_jwk is not None and a.public_jwk["kid"] == a.kid
    named = load_signing_key(JwtConfig(algorithm="ES256", private_key_file=str(pem), kid="k-1"))
    assert named.kid == "k-1"
    hs = load_signing_key(JwtConfig(secret=JWT_SECRET))
    assert JWT_SECRET not in hs.kid and hs.public_jwk is None


async def test_invalidating_a_key_forgets_its_token(gw: Harness) -> None:
    await gw.client.get("/x", headers=GOOD)
    first = token_seen(gw)
    response = await gw.ops.delete("/admin/cache/k1", headers=gw.admin_headers())
    assert response.status == 200
    await gw.client.get("/x", headers=GOOD)
    assert token_seen(gw) != first
    assert gw.tower.calls == ["good-key-1", "good-key-1"]


async def test_token_follows_a_changed_identity(make_gateway: GatewayFactory) -> None:
    """A key whose expiry the tower shortens (a rotation with grace) gets a token to match."""
    clock = Clock()
    h = await make_gateway(clock=clock, cache={"ttl": 10})
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator", team="blue")
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    first = decode_hs(token_seen(h))
    new_expiry = int(clock.now) + 30
    h.tower.keys["good-key-1"].update(expires_at=new_expiry, metadata={"team": "green"})
    clock.advance(11)  # the identity is refreshed from the tower
    assert (await h.client.get("/x", headers=GOOD)).status == 200
    assert h.tower.calls == ["good-key-1", "good-key-1"]
    second = jwt.decode(token_seen(h), options={"verify_signature": False})
    assert second["jti"] != first["jti"]
    assert second["exp"] <= new_expiry
    assert second["team"] == "green"
