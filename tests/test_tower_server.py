"""The served embedded tower speaks the remote tower contract (CONTRACT section 3)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import TowerConfig
from gateway.errors import TowerFault
from gateway.tower import Identity, Rejection, parse_answer
from gateway.tower.client import RemoteTower
from gateway.tower.server import MAX_REQUEST_BYTES, create_tower_app
from gateway.tower.store import KeyStore

API_KEY = "gateway-credential-0123456789"
SECRET = "tower-shared-secret-0123456789"
GOOD = {"Authorization": f"Bearer {API_KEY}", "X-Tower-Secret": SECRET}

Client = TestClient[Any, Any]
MakeClient = Callable[..., Coroutine[Any, Any, Client]]
MakeServer = Callable[..., Coroutine[Any, Any, TestServer]]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


@pytest.fixture
def store(db: Path) -> Iterator[KeyStore]:
    s = KeyStore(db, hash_secret=b"h" * 32)
    yield s
    s.close()


@pytest.fixture
async def client(store: KeyStore, aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(create_tower_app(store, api_key=API_KEY, secret=SECRET))


async def _validate(client: Client, key: object, headers: dict[str, str] = GOOD) -> Any:
    response = await client.post("/api/v1/validate", json={"api_key": key}, headers=headers)
    return response.status, await response.json()


async def test_valid_key_gets_an_answer_parse_answer_accepts(
    client: Client, store: KeyStore
) -> None:
    raw, record = store.create("alice", "operator", scopes=["s1"], team="blue", rate_limit=9)
    status, body = await _validate(client, raw)
    assert status == 200
    identity = parse_answer(status, body)
    assert isinstance(identity, Identity)
    assert (identity.key_id, identity.user_id, identity.role) == (
        record.key_id,
        "alice",
        "operator",
    )
    assert (identity.scopes, identity.team, identity.rate_limit) == (("s1",), "blue", 9)


async def test_invalid_and_revoked_keys_are_200_with_valid_false(
    client: Client, store: KeyStore
) -> None:
    status, body = await _validate(client, "tk_test_made_up")
    assert (status, body) == (200, {"valid": False, "reason": "invalid_key"})
    assert parse_answer(status, body) == Rejection("invalid_key")

    raw, record = store.create("alice", "admin")
    store.revoke(record.key_id)
    status, body = await _validate(client, raw)
    assert parse_answer(status, body) == Rejection("revoked_key")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Tower-Secret": SECRET},
        {"Authorization": f"Bearer {API_KEY}"},
        {"Authorization": f"Bearer {API_KEY}x", "X-Tower-Secret": SECRET},
        {"Authorization": f"bearer {API_KEY}", "X-Tower-Secret": SECRET},
        {"Authorization": API_KEY, "X-Tower-Secret": SECRET},
        {"Authorization": f"Bearer {API_KEY}", "X-Tower-Secret": SECRET[:-1]},
        {"Authorization": f"Bearer {SECRET}", "X-Tower-Secret": API_KEY},
    ],
)
async def test_wrong_tower_credentials_get_401(
    client: Client, store: KeyStore, headers: dict[str, str]
) -> None:
    raw, _ = store.create("alice", "admin")
    status, body = await _validate(client, raw, headers)
    assert status == 401
    assert body["error"] == "unauthorized" and "valid" not in body
    assert store.pending_usage == 0


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[1, 2]", b'{"key": "x"}', b'{"api_key": 5}', b'{"api_key": null}', b"\xff"],
)
async def test_malformed_bodies_get_400(client: Client, data: bytes) -> None:
    response = await client.post("/api/v1/validate", data=data, headers=GOOD)
    assert response.status == 400
    assert (await response.json())["error"] == "malformed_request"


async def test_oversized_bodies_get_400_with_or_without_a_length(client: Client) -> None:
    big = b'{"api_key": "' + b"a" * MAX_REQUEST_BYTES + b'"}'
    response = await client.post("/api/v1/validate", data=big, headers=GOOD)
    assert response.status == 400

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"a" * MAX_REQUEST_BYTES

    response = await client.post("/api/v1/validate", data=chunks(), headers=GOOD)
    assert response.status == 400


async def test_healthz(client: Client, db: Path) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE api_keys")
    conn.close()
    assert (await client.get("/healthz")).status == 503
    status, body = await _validate(client, "tk_test_" + "a" * 38)
    assert status == 200 and body["valid"] is False  # refused before the store is asked


async def test_usage_is_flushed_when_the_app_stops(
    store: KeyStore, aiohttp_client: MakeClient
) -> None:
    client = await aiohttp_client(create_tower_app(store, api_key=API_KEY, secret=SECRET))
    raw, record = store.create("alice", "admin")
    await _validate(client, raw)
    await _validate(client, raw)
    assert store.get(record.key_id).use_count == 0
    await client.close()
    assert store.get(record.key_id).use_count == 2


async def test_the_remote_tower_client_reads_the_served_tower(
    store: KeyStore, aiohttp_server: MakeServer
) -> None:
    server = await aiohttp_server(create_tower_app(store, api_key=API_KEY, secret=SECRET))
    url = str(server.make_url("")).rstrip("/")
    raw, record = store.create("alice", "node", expires_in_days=1)

    remote = RemoteTower(TowerConfig(url=url, api_key=API_KEY, secret=SECRET))
    try:
        identity = await remote.validate(raw)
        assert isinstance(identity, Identity) and identity.key_id == record.key_id
        assert identity.expires_at == record.expires_at
        assert await remote.validate(raw[:-1] + "!") == Rejection("invalid_key")
    finally:
        await remote.close()

    wrong = RemoteTower(TowerConfig(url=url, api_key=API_KEY, secret="not-the-secret"))
    try:
        with pytest.raises(TowerFault) as fault:
            await wrong.validate(raw)
        assert fault.value.kind == "tower_auth"
    finally:
        await wrong.close()


def test_the_app_needs_both_credentials(store: KeyStore) -> None:
    with pytest.raises(ValueError):
        create_tower_app(store, api_key="", secret=SECRET)
    with pytest.raises(ValueError):
        create_tower_app(store, api_key=API_KEY, secret="")
