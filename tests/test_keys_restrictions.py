"""The embedded tower's restriction flags: `keys create|update --allow-ip --allow-origin --quota
--limit-scope`, validated with clear errors, shown by `keys list` and `keys show`, and served in
the tower's answer exactly as the gateway reads it."""

from __future__ import annotations

import pytest

from gateway.tower import Identity, parse_answer
from gateway.tower.constraints import Quota
from gateway.tower.records import StoreError
from gateway.tower.store import KeyStore
from tests.test_keys_cli import _clean_env, _create, config, run, store

__all__ = ["_clean_env", "config", "store"]  # the fixtures of the CLI tests


def test_create_sets_every_restriction_and_the_tower_serves_them(
    capsys: pytest.CaptureFixture[str], config: str, store: KeyStore
) -> None:
    key, key_id = _create(
        capsys,
        config,
        "--role", "operator",
        "--allow-ip", "10.0.0.0/8", "--allow-ip", "2001:db8::/32",
        "--allow-origin", "https://app.example.com",
        "--quota", "1000/day",
        "--limit-scope", "user",
    )  # fmt: skip
    answer = store.lookup(key)
    assert answer["metadata"] == {
        "allowed_ips": ["10.0.0.0/8", "2001:db8::/32"],
        "allowed_origins": ["https://app.example.com"],
        "quota": {"limit": 1000, "period": "day"},
        "rate_limit_scope": "user",
    }
    identity = parse_answer(200, answer)
    assert isinstance(identity, Identity)
    limits = identity.constraints
    assert limits.malformed is None and limits.quota == Quota(1000, "day")
    assert limits.ips is not None and limits.ips.allows("10.2.3.4")

    assert run("keys", "list", "--config", str(config)) == 0
    table = capsys.readouterr().out
    assert "RESTRICTIONS" in table and "REPORTED" in table
    assert "ips:2 origins:1 quota:1000/day scope:user" in table

    store.flush_usage()
    assert run("keys", "show", "--config", str(config), key_id) == 0
    shown = capsys.readouterr().out
    assert "ips:        10.0.0.0/8, 2001:db8::/32" in shown
    assert "quota:      1000/day" in shown and "scope:      user" in shown
    assert "requests:   1" in shown and key[12:] not in shown
    assert "by_status:  none reported" in shown


def test_update_changes_and_clears_restrictions(
    capsys: pytest.CaptureFixture[str], config: str, store: KeyStore
) -> None:
    key, key_id = _create(capsys, config, "--role", "operator", "--quota", "5/month")
    argv = ("keys", "update", "--config", str(config), key_id)
    assert run(*argv, "--allow-ip", "192.0.2.7", "--limit-scope", "team") == 0
    assert "ips:        192.0.2.7" in capsys.readouterr().out
    assert store.lookup(key)["metadata"] == {
        "allowed_ips": ["192.0.2.7"],
        "quota": {"limit": 5, "period": "month"},
        "rate_limit_scope": "team",
    }
    assert run(*argv, "--clear-quota", "--clear-allowed-ips") == 0
    capsys.readouterr()
    assert store.lookup(key)["metadata"] == {"rate_limit_scope": "team"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--allow-ip", "10.0.0.1/8"], "error: --allow-ip '10.0.0.1/8': 10.0.0.1/8 has host bits"),
        (["--allow-ip", "example.com"], "error: --allow-ip 'example.com'"),
        (["--allow-origin", "app.example.com"], "error: --allow-origin 'app.example.com'"),
        (["--quota", "10/week"], "error: --quota '10/week': expected N/day or N/month"),
        (["--quota", "0/day"], "error: --quota '0/day'"),
        (["--quota=-1/day"], "error: --quota '-1/day'"),
    ],
)
def test_bad_restrictions_exit_1_with_one_clear_line(
    capsys: pytest.CaptureFixture[str], config: str, flags: list[str], message: str
) -> None:
    code = run(
        "keys", "create", "--config", str(config), "--user-id", "u", "--role", "operator", *flags
    )
    captured = capsys.readouterr()
    assert code == 1 and captured.err.startswith(message), captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_update_of_nothing_or_of_an_unknown_key_is_refused(
    capsys: pytest.CaptureFixture[str], config: str
) -> None:
    assert run("keys", "update", "--config", str(config), "key_0000000000000000") == 1
    assert "nothing to change" in capsys.readouterr().err
    argv = ("keys", "update", "--config", str(config), "key_0000000000000000", "--quota", "1/day")
    assert run(*argv) == 1
    assert "no key with id" in capsys.readouterr().err


def test_the_store_refuses_metadata_the_gateway_could_not_read(store: KeyStore) -> None:
    with pytest.raises(StoreError, match="allowed_ips"):
        store.create("u", "operator", metadata={"allowed_ips": ["300.0.0.1"]})
    with pytest.raises(StoreError, match="rate_limit_scope"):
        store.create("u", "operator", metadata={"rate_limit_scope": "world"})
