"""`keys create|list|revoke|rotate` and `tower serve`, run as an operator would."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.cli.keys import register
from gateway.config import load_config
from gateway.tower import keyformat
from gateway.tower.local import resolve_hash_secret
from gateway.tower.store import KeyStore

ROOT = Path(__file__).resolve().parent.parent
JWT_SECRET = "j" * 40
TOWER_API_KEY = "served-tower-api-key-0123"
TOWER_SECRET = "served-tower-secret-0123"


def _write_config(path: Path, extra: str = "", local: bool = True) -> Path:
    tower = "tower:\n  local: {db: keys.db}\n" if local else "tower:\n  url: http://x:1\n"
    path.write_text(f"{tower}{extra}jwt:\n  secret: {JWT_SECRET}\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TOWER_API_KEY", "TOWER_SECRET", "TOWER_GATEWAY_CONFIG", "GATEWAY_ADMIN_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TOWER_API_KEY", "remote-key")
    monkeypatch.setenv("TOWER_SECRET", "remote-secret")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return _write_config(tmp_path / "gateway.yaml")


@pytest.fixture
def store(config: Path) -> Iterator[KeyStore]:
    local = load_config(config).tower.local
    assert local is not None
    s = KeyStore(local.db, prefix=local.prefix, hash_secret=resolve_hash_secret(local))
    yield s
    s.close()


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tower-gateway")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def _create(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> tuple[str, str]:
    code = run("keys", "create", "--config", str(config), "--user-id", "alice", *extra)
    out = capsys.readouterr().out
    assert code == 0
    key = out.splitlines()[-1]
    key_id = re.search(r"key_id:\s+(key_[0-9a-f]{16})", out)
    assert key_id is not None
    return key, key_id.group(1)


def test_create_prints_the_key_last_and_list_never_shows_it(
    capsys: pytest.CaptureFixture[str], config: Path, store: KeyStore
) -> None:
    key, key_id = _create(
        capsys,
        config,
        "--role",
        "operator",
        "--scope",
        "tools:execute",
        "--scope",
        "read",
        "--expires-in-days",
        "3",
        "--env",
        "live",
        "--rate-limit",
        "20",
        "--team",
        "blue",
    )
    assert keyformat.looks_valid(key, "tk") and key.startswith("tk_live_")
    answer = store.lookup(key)
    assert answer["valid"] is True and answer["key_id"] == key_id
    assert answer["scopes"] == ["read", "tools:execute"]
    assert answer["metadata"] == {"rate_limit": 20, "team": "blue"}

    assert run("keys", "list", "--config", str(config)) == 0
    table = capsys.readouterr().out
    assert key_id in table and "alice" in table and key[:12] in table and "active" in table
    assert key not in table and key[12:] not in table

    assert run("keys", "list", "--config", str(config), "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["key_id"] for k in listed] == [key_id]
    assert key[12:] not in json.dumps(listed) and "key_hash" not in listed[0]


def test_revoke_and_rotate(
    capsys: pytest.CaptureFixture[str], config: Path, store: KeyStore
) -> None:
    old_key, old_id = _create(capsys, config, "--role", "admin")

    assert run("keys", "rotate", "--config", str(config), old_id, "--grace-hours", "2") == 0
    out = capsys.readouterr().out
    new_key = out.splitlines()[-1]
    assert keyformat.looks_valid(new_key, "tk") and new_key != old_key
    assert store.lookup(new_key)["user_id"] == "alice"
    assert store.lookup(old_key)["valid"] is True  # still inside its grace
    new_id = store.lookup(new_key)["key_id"]

    assert run("keys", "revoke", "--config", str(config), new_id, "--reason", "leaked") == 0
    assert new_id in capsys.readouterr().out
    assert store.lookup(new_key) == {"valid": False, "reason": "revoked_key"}

    assert run("keys", "list", "--config", str(config)) == 0
    table = capsys.readouterr().out
    assert "revoked" in table and "rotated" in table


def test_show_and_update_change_the_key_in_place(
    capsys: pytest.CaptureFixture[str], config: Path, store: KeyStore
) -> None:
    key, key_id = _create(capsys, config, "--role", "operator", "--rate-limit", "5")
    argv = ["keys", "update", "--config", str(config), key_id]
    changes = ["--role", "admin", "--scope", "a", "--scope", "b", "--team", "red"]
    assert run(*argv, *changes, "--expires-in-days", "5") == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"updated {key_id}: expires_at, role, scopes, team")
    assert "cache entry expires" in captured.err and key not in captured.out
    answer = store.lookup(key)
    assert (answer["role"], answer["scopes"]) == ("admin", ["a", "b"])
    assert answer["metadata"] == {"rate_limit": 5, "team": "red"}
    assert abs(answer["expires_at"] - (time.time() + 5 * 86400)) < 60

    assert run(*argv, "--never-expires", "--rate-limit", "0", "--team", "") == 0
    capsys.readouterr()
    answer = store.lookup(key)
    assert answer["expires_at"] is None and answer["metadata"] == {}

    assert run("keys", "show", "--config", str(config), key_id, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["record"]["role"] == "admin" and shown["record"]["status"] == "active"
    assert shown["usage"]["statuses"] is None and key[12:] not in json.dumps(shown)
    assert run("keys", "show", "--config", str(config), key_id) == 0
    assert "status:     active" in capsys.readouterr().out

    assert run(*argv) == 1
    assert capsys.readouterr().err.startswith("error: nothing to change")
    assert run("keys", "revoke", "--config", str(config), key_id) == 0
    capsys.readouterr()
    assert run(*argv, "--role", "operator") == 1
    assert "revoked and cannot be changed" in capsys.readouterr().err
    assert run("keys", "show", "--config", str(config), "key_0000000000000000") == 1


def test_rotate_without_grace_refuses_the_old_key(
    capsys: pytest.CaptureFixture[str], config: Path, store: KeyStore
) -> None:
    old_key, old_id = _create(capsys, config, "--role", "admin")
    assert run("keys", "rotate", "--config", str(config), old_id, "--grace-hours", "0") == 0
    new_key = capsys.readouterr().out.splitlines()[-1]
    assert store.lookup(old_key)["valid"] is False
    assert store.lookup(new_key)["valid"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "create", "--user-id", "u", "--role", ""], "error: role"),
        (["keys", "create", "--user-id", "u", "--role", "ad\x07min"], "error: role"),
        (
            ["keys", "create", "--user-id", "u", "--role", "admin", "--expires-in-days", "0"],
            "error: expires_in_days",
        ),
        (
            ["keys", "create", "--user-id", "u", "--role", "admin", "--expires-in-days", "-2"],
            "error: expires_in_days",
        ),
        (
            ["keys", "create", "--user-id", "u", "--role", "admin", "--rate-limit", "-1"],
            "error: rate_limit",
        ),
        (["keys", "revoke", "key_0000000000000000"], "error: no key with id"),
        (["keys", "rotate", "key_0000000000000000"], "error: no key with id"),
    ],
)
def test_store_errors_exit_1_with_one_clear_line(
    capsys: pytest.CaptureFixture[str], config: Path, argv: list[str], message: str
) -> None:
    assert run(*argv, "--config", str(config)) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(message)
    assert [line for line in captured.err.splitlines() if line.startswith("error:")] == [
        captured.err.splitlines()[-1]
    ]
    assert "Traceback" not in captured.err and captured.out == ""


def test_unmapped_role_is_created_with_a_warning(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    code = run("keys", "create", "--config", str(config), "--user-id", "u", "--role", "robot")
    captured = capsys.readouterr()
    assert code == 0 and "warning: role 'robot'" in captured.err
    assert keyformat.looks_valid(captured.out.splitlines()[-1], "tk")


def test_config_problems_exit_2_naming_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    remote_only = _write_config(tmp_path / "remote.yaml", local=False)
    assert run("keys", "list", "--config", str(remote_only)) == 2
    assert capsys.readouterr().err.startswith("error: tower.local: is not set")

    unknown = _write_config(tmp_path / "unknown.yaml", extra="bogus: 1\n")
    assert run("keys", "list", "--config", str(unknown)) == 2
    assert capsys.readouterr().err.strip() == "error: bogus: unknown key"

    assert run("keys", "list", "--config", str(tmp_path / "missing.yaml")) == 2
    assert capsys.readouterr().err.startswith("error: cannot read")


def test_config_defaults_to_the_environment(
    capsys: pytest.CaptureFixture[str], config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_GATEWAY_CONFIG", str(config))
    assert run("keys", "create", "--user-id", "u", "--role", "admin") == 0
    capsys.readouterr()
    assert run("keys", "list", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


def test_tower_serve_needs_credentials(
    capsys: pytest.CaptureFixture[str], config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOWER_API_KEY")
    assert run("tower", "serve", "--config", str(config)) == 2
    assert capsys.readouterr().err.startswith("error: tower.api_key: is not set")


def test_tower_serve_answers_until_sigterm(tmp_path: Path, store: KeyStore) -> None:
    config = _write_config(
        tmp_path / "served.yaml",
        extra=f"  api_key: {TOWER_API_KEY}\n  secret: {TOWER_SECRET}\n",
    )
    raw, record = store.create("alice", "admin")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli.keys",
            "tower",
            "serve",
            "--config",
            str(config),
            "--port",
            "0",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"tower listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        headers = {"Authorization": f"Bearer {TOWER_API_KEY}", "X-Tower-Secret": TOWER_SECRET}
        with httpx.Client(base_url=match.group(1), trust_env=False) as http:
            answer = http.post("/api/v1/validate", json={"api_key": raw}, headers=headers)
            assert answer.status_code == 200 and answer.json()["key_id"] == record.key_id
            refused = http.post("/api/v1/validate", json={"api_key": raw})
            assert refused.status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.communicate()
    assert store.get(record.key_id).use_count == 1  # flushed on the way out
