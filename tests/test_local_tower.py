"""The embedded tower: key format, the SQLite key store and `LocalTower`, on real files."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import LocalTowerConfig
from gateway.errors import ConfigError, TowerFault
from gateway.tower import Identity, Rejection, keyformat, parse_answer
from gateway.tower.local import LocalTower, resolve_hash_secret
from gateway.tower.records import KeyNotFound, StoreError
from gateway.tower.store import KeyStore

ROOT = Path(__file__).resolve().parent.parent
SECRET = b"s" * 32


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


@pytest.fixture
def store(db: Path) -> Iterator[KeyStore]:
    s = KeyStore(db, hash_secret=SECRET)
    yield s
    s.close()


def _db_row(db: Path, key_id: str) -> tuple[int, float | None]:
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT use_count, last_used_at FROM api_keys WHERE key_id = ?", (key_id,)
        ).fetchone()
    conn.close()
    return row[0], row[1]


def _mutations(key: str) -> Iterator[str]:
    """Every single-character change of the random part and checksum."""
    start = len(keyformat.display_prefix(key)) - keyformat.DISPLAY_RANDOM_CHARS
    for i in range(start, len(key)):
        replacement = "A" if key[i] != "A" else "B"
        yield key[:i] + replacement + key[i + 1 :]


# --------------------------------------------------------------------------- key format


def test_generated_keys_have_the_documented_shape() -> None:
    key = keyformat.generate("tk", "live")
    assert key.startswith("tk_live_")
    assert len(key) == len("tk_live_") + keyformat.RANDOM_LENGTH + keyformat.CHECKSUM_LENGTH
    assert keyformat.looks_valid(key, "tk")
    assert keyformat.display_prefix(key) == key[:12]
    assert keyformat.env_of(key) == "live"
    assert len({keyformat.generate("tk", "test") for _ in range(200)}) == 200


def test_checksum_refuses_every_single_character_typo() -> None:
    key = keyformat.generate("tk", "test")
    assert not any(keyformat.looks_valid(m, "tk") for m in _mutations(key))


@pytest.mark.parametrize(
    "candidate",
    ["", "tk_test_", "tk_prod_" + "a" * 38, "tk-test-" + "a" * 38, "xx_test_" + "a" * 38, None],
)
def test_made_up_keys_are_refused(candidate: object) -> None:
    assert not keyformat.looks_valid(candidate, "tk")


def test_other_prefix_is_refused() -> None:
    assert not keyformat.looks_valid(keyformat.generate("acme", "test"), "tk")
    with pytest.raises(ValueError):
        keyformat.generate("tk", "prod")
    with pytest.raises(ValueError):
        keyformat.generate("Bad", "test")


# --------------------------------------------------------------------------- store


def test_create_then_lookup_answers_the_tower_contract(store: KeyStore) -> None:
    raw, record = store.create(
        "alice",
        "operator",
        scopes=["tools:execute", "read"],
        expires_in_days=30,
        env="live",
        rate_limit=50,
        team="blue",
        metadata={"note": "ci"},
    )
    assert raw.startswith("tk_live_") and record.key_id.startswith("key_")
    assert record.display_prefix == raw[:12] and record.status == "active"
    assert record.scopes == ("read", "tools:execute")

    body = store.lookup(raw)
    assert body == {
        "valid": True,
        "key_id": record.key_id,
        "user_id": "alice",
        "role": "operator",
        "scopes": ["read", "tools:execute"],
        "expires_at": record.expires_at,
        "metadata": {"note": "ci", "rate_limit": 50, "team": "blue"},
    }
    identity = parse_answer(200, json.loads(json.dumps(body)))
    assert isinstance(identity, Identity)
    assert (identity.user_id, identity.team, identity.rate_limit) == ("alice", "blue", 50)
    assert record.expires_at is not None
    assert abs(record.expires_at - (time.time() + 30 * 86400)) < 60


def test_malformed_key_is_refused_without_a_query(store: KeyStore) -> None:
    raw, _ = store.create("alice", "admin")
    before = store.queries
    for bad in [*_mutations(raw), "", "tk_test_short", raw + "x", keyformat.generate("zz", "test")]:
        assert store.lookup(bad) == {"valid": False, "reason": "invalid_key"}
    assert store.queries == before

    # A well-formed key nobody issued does reach the database, and is refused.
    assert store.lookup(keyformat.generate("tk", "test")) == {
        "valid": False,
        "reason": "invalid_key",
    }
    assert store.queries == before + 1


def test_expired_key_is_refused(store: KeyStore) -> None:
    raw, record = store.create("alice", "admin", expires_in_days=1)
    assert store.lookup(raw)["valid"] is True
    later = time.time() + 2 * 86400
    assert store.lookup(raw, now=later) == {"valid": False, "reason": "expired_key"}
    assert record.state(later) == "expired"


def test_revoked_key_is_refused(store: KeyStore) -> None:
    raw, record = store.create("alice", "admin")
    revoked = store.revoke(record.key_id, reason="leaked")
    assert (revoked.status, revoked.revoke_reason) == ("revoked", "leaked")
    assert revoked.revoked_at is not None
    assert store.lookup(raw) == {"valid": False, "reason": "revoked_key"}
    assert parse_answer(200, store.lookup(raw)) == Rejection("revoked_key")
    # Revoking again keeps the first revocation.
    assert store.revoke(record.key_id, reason="again") == revoked


def test_rotation_honours_the_grace_then_refuses(store: KeyStore) -> None:
    old_raw, old = store.create("alice", "operator", scopes=["a"], team="blue", rate_limit=7)
    new_raw, new = store.rotate(old.key_id, grace_hours=1)
    now = time.time()

    assert new_raw != old_raw and new.key_id != old.key_id
    same = ("user_id", "role", "scopes", "metadata", "expires_at", "env")
    assert all(getattr(new, f) == getattr(old, f) for f in same)
    rotated = store.get(old.key_id)
    assert (rotated.status, rotated.rotated_to) == ("rotated", new.key_id)
    assert rotated.grace_until is not None and abs(rotated.grace_until - (now + 3600)) < 60

    # During the grace both work, and the old key's answer ends with the grace.
    old_answer = store.lookup(old_raw)
    assert old_answer["valid"] is True and old_answer["expires_at"] == rotated.grace_until
    assert store.lookup(new_raw)["valid"] is True

    after = rotated.grace_until + 1
    assert store.lookup(old_raw, now=after) == {"valid": False, "reason": "expired_key"}
    assert store.lookup(new_raw, now=after)["valid"] is True

    with pytest.raises(StoreError, match="already rotated"):
        store.rotate(old.key_id)


def test_rotation_keeps_an_earlier_expiry(store: KeyStore) -> None:
    _, old = store.create("alice", "admin", expires_in_days=1)
    _, new = store.rotate(old.key_id, grace_hours=48)
    assert new.expires_at == old.expires_at
    assert store.get(old.key_id).expires_at == old.expires_at


def test_rotation_without_grace_refuses_the_old_key_at_once(store: KeyStore) -> None:
    old_raw, old = store.create("alice", "admin")
    new_raw, _ = store.rotate(old.key_id, grace_hours=0)
    assert store.lookup(old_raw)["valid"] is False
    assert store.lookup(new_raw)["valid"] is True


def test_revoked_key_cannot_be_rotated(store: KeyStore) -> None:
    _, record = store.create("alice", "admin")
    store.revoke(record.key_id)
    with pytest.raises(StoreError, match="revoked"):
        store.rotate(record.key_id)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": ""}, "role"),
        ({"role": "ad\nmin"}, "role"),
        ({"role": "x" * 300}, "role"),
        ({"user_id": " "}, "user_id"),
        ({"expires_in_days": 0}, "expires_in_days"),
        ({"expires_in_days": -3}, "expires_in_days"),
        ({"expires_in_days": float("nan")}, "expires_in_days"),
        ({"env": "prod"}, "env"),
        ({"scopes": "admin:full"}, "scopes"),
        ({"scopes": ["ok", ""]}, "scope"),
        ({"rate_limit": 0}, "rate_limit"),
        ({"team": "\x00"}, "team"),
        ({"metadata": {"team": 5}}, "team"),
        ({"metadata": {"x": object()}}, "metadata"),
    ],
)
def test_bad_input_is_a_clear_error(
    store: KeyStore, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"user_id": "alice", "role": "admin", **kwargs}
    with pytest.raises(StoreError, match=message):
        store.create(**args)  # type: ignore[arg-type]
    assert store.list() == []


def test_unknown_key_id_is_a_clear_error(store: KeyStore) -> None:
    for call in (store.get, store.revoke, store.rotate):
        with pytest.raises(KeyNotFound, match="no key with id 'key_nope'"):
            call("key_nope")
    _, record = store.create("alice", "admin")
    with pytest.raises(StoreError, match="grace_hours"):
        store.rotate(record.key_id, grace_hours=-1)


def test_list_shows_every_key_in_creation_order(store: KeyStore) -> None:
    ids = [store.create(f"user{i}", "admin")[1].key_id for i in range(3)]
    assert [r.key_id for r in store.list()] == ids
    assert "key_hash" not in store.list()[0].to_json()


def test_raw_keys_never_reach_the_database_files(store: KeyStore, db: Path) -> None:
    raws = [store.create(f"user{i}", "admin", team="t")[0] for i in range(5)]
    raws.append(store.rotate(store.list()[0].key_id)[0])
    for raw in raws:
        assert store.lookup(raw)["valid"] is True
    store.flush_usage()

    def on_disk() -> bytes:
        return b"".join(
            Path(f"{db}{suffix}").read_bytes()
            for suffix in ("", "-wal", "-shm")
            if Path(f"{db}{suffix}").exists()
        )

    before_checkpoint = on_disk()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    for data in (before_checkpoint, on_disk()):
        assert data
        for raw in raws:
            secret_part = raw[len(keyformat.display_prefix(raw)) :]
            assert raw.encode() not in data
            assert secret_part.encode() not in data
            # Not an unkeyed hash either: without the hash secret it cannot be checked.
            assert hashlib.sha256(raw.encode()).digest() not in data
            assert hashlib.sha256(raw.encode()).hexdigest().encode() not in data


def test_usage_is_counted_in_memory_and_written_in_batches(store: KeyStore, db: Path) -> None:
    raw, record = store.create("alice", "admin")
    for _ in range(3):
        store.lookup(raw)
    assert store.pending_usage == 3
    assert _db_row(db, record.key_id) == (0, None)

    assert store.flush_usage() == 1
    count, last_used = _db_row(db, record.key_id)
    assert count == 3 and last_used is not None and abs(last_used - time.time()) < 60
    assert store.flush_usage() == 0
    assert store.get(record.key_id).use_count == 3


def test_database_files_are_owner_only(store: KeyStore, db: Path) -> None:
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_newer_schema_is_refused(db: Path) -> None:
    KeyStore(db, hash_secret=SECRET).close()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        KeyStore(db, hash_secret=SECRET)


def test_a_file_that_is_not_a_database_is_a_clear_error(db: Path) -> None:
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open key store"):
        KeyStore(db, hash_secret=SECRET)


def test_short_hash_secret_is_refused(db: Path) -> None:
    with pytest.raises(StoreError, match="hash secret"):
        KeyStore(db, hash_secret=b"short")


# --------------------------------------------------------------------------- hash secret


def test_hash_secret_is_generated_once_beside_the_db(db: Path) -> None:
    cfg = LocalTowerConfig(db=str(db))
    first = resolve_hash_secret(cfg)
    assert len(first) == 32 and resolve_hash_secret(cfg) == first
    secret_file = Path(f"{db}.secret")
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert bytes.fromhex(secret_file.read_text()) == first


def test_configured_hash_secret_wins(db: Path) -> None:
    cfg = LocalTowerConfig(db=str(db), hash_secret="x" * 32)
    assert resolve_hash_secret(cfg) == b"x" * 32
    assert not Path(f"{db}.secret").exists()
    with pytest.raises(ConfigError) as err:
        resolve_hash_secret(LocalTowerConfig(db=str(db), hash_secret="short"))
    assert err.value.path == "tower.local.hash_secret"


# --------------------------------------------------------------------------- processes

_WORKER = """
import json, os, sys, time
from pathlib import Path
from gateway.config import LocalTowerConfig
from gateway.tower.local import resolve_hash_secret
from gateway.tower.store import KeyStore

db, name, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
Path(f"{go}.{name}.ready").touch()
deadline = time.monotonic() + 20
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.005)
cfg = LocalTowerConfig(db=db)
store = KeyStore(db, hash_secret=resolve_hash_secret(cfg))
keys = []
for i in range(count):
    raw, record = store.create(f"{name}-{i}", "api_client")
    assert store.lookup(raw)["key_id"] == record.key_id
    keys.append(raw)
store.flush_usage()
print(json.dumps(keys))
"""


def test_two_processes_creating_and_validating_lose_nothing(tmp_path: Path) -> None:
    db, go = tmp_path / "shared.db", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(db), name, "50", str(go)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = []
    try:
        deadline = time.monotonic() + 20
        while not all(Path(f"{go}.{n}.ready").exists() for n in "ab"):
            assert time.monotonic() < deadline, "workers did not start"
            for worker in workers:
                if worker.poll() is not None:
                    pytest.fail(f"a worker exited before the start: {worker.communicate()[1]}")
            time.sleep(0.01)
        go.touch()  # both open the fresh database and race from here
        outputs = [worker.communicate(timeout=60) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
            worker.communicate()

    keys: list[str] = []
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
        keys += json.loads(out)

    assert len(set(keys)) == 100
    store = KeyStore(db, hash_secret=resolve_hash_secret(LocalTowerConfig(db=str(db))))
    try:
        records = store.list()
        assert len(records) == 100
        assert {r.use_count for r in records} == {1}
        assert {store.lookup(k)["user_id"] for k in keys} == {r.user_id for r in records}
    finally:
        store.close()


# --------------------------------------------------------------------------- LocalTower


@pytest.fixture
async def tower(db: Path) -> LocalTower:
    return LocalTower(LocalTowerConfig(db=str(db), usage_flush_interval=0.05))


async def test_local_tower_answers_like_a_remote_one(tower: LocalTower) -> None:
    try:
        raw, record = tower.store.create("alice", "admin", scopes=["x"], team="blue")
        identity = await tower.validate(raw)
        assert isinstance(identity, Identity)
        assert (identity.key_id, identity.user_id, identity.role) == (
            record.key_id,
            "alice",
            "admin",
        )
        assert identity.scopes == ("x",) and identity.team == "blue"

        assert await tower.validate("tk_test_nope") == Rejection("invalid_key")
        tower.store.revoke(record.key_id)
        assert await tower.validate(raw) == Rejection("revoked_key")
        assert await tower.ping() is True
        assert tower.name == "local"
    finally:
        await tower.close()


async def test_local_tower_flushes_usage_in_the_background_and_on_close(
    tower: LocalTower, db: Path
) -> None:
    raw, record = tower.store.create("alice", "admin")
    await tower.start()
    await tower.validate(raw)
    for _ in range(100):
        if _db_row(db, record.key_id)[0] == 1:
            break
        await asyncio.sleep(0.02)
    assert _db_row(db, record.key_id)[0] == 1

    await tower.validate(raw)
    await tower.close()
    assert _db_row(db, record.key_id)[0] == 2


async def test_a_broken_store_is_a_tower_fault_never_a_valid_key(
    tower: LocalTower, db: Path
) -> None:
    try:
        raw, _ = tower.store.create("alice", "admin")
        with sqlite3.connect(db) as conn:
            conn.execute("DROP TABLE api_keys")
        conn.close()
        with pytest.raises(TowerFault) as fault:
            await tower.validate(raw)
        assert fault.value.kind == "error" and raw not in str(fault.value)
        assert await tower.ping() is False
    finally:
        await tower.close()


def test_local_tower_names_the_config_key_when_the_db_cannot_be_opened(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError) as err:
        LocalTower(LocalTowerConfig(db=str(bad), hash_secret="h" * 32))
    assert err.value.path == "tower.local.db"
