"""Every command reads only the config it uses: `keys` and `tower serve` need no JWT secret,
and `check-config` on the shipped gateway.yaml says what is missing and how to set it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.config import load_config, load_sections
from gateway.errors import ConfigError
from tests.fresh import free_port, fresh_env

ROOT = Path(__file__).resolve().parent.parent


def _cli(cwd: Path, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    (tmp_path / "gateway.yaml").write_text((ROOT / "gateway.yaml").read_text())
    return tmp_path


def test_keys_on_the_shipped_config_need_no_jwt_secret(shipped: Path) -> None:
    env = fresh_env()
    created = _cli(
        shipped, env, "keys", "create", "--config", "gateway.yaml", "--user-id", "alice",
        "--role", "operator", "--scope", "tools:execute",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert created.stdout.splitlines()[-1].startswith("tk_test_")
    listed = _cli(shipped, env, "keys", "list", "--config", "gateway.yaml")
    assert listed.returncode == 0, listed.stderr
    assert "alice" in listed.stdout and "active" in listed.stdout
    assert (shipped / "tower-gateway.db").is_file()


def test_tower_serve_on_the_shipped_config_needs_only_its_credentials(shipped: Path) -> None:
    with httpx.Client() as probe:
        port = free_port()
        env = fresh_env(TOWER_API_KEY="served-key-0123456789", TOWER_SECRET="served-secret-0123")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "tower", "serve", "--config", "gateway.yaml",
             "--port", str(port)],
            cwd=shipped,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith(f"tower listening on http://127.0.0.1:{port}")
            answer = probe.post(
                f"http://127.0.0.1:{port}/api/v1/validate",
                json={"api_key": "tk_test_x"},
                headers={
                    "Authorization": "Bearer served-key-0123456789",
                    "X-Tower-Secret": "served-secret-0123",
                },
            )
            assert answer.status_code == 200
            assert answer.json()["valid"] is False
        finally:
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_tower_serve_names_the_credentials_it_misses(shipped: Path) -> None:
    result = _cli(shipped, fresh_env(), "tower", "serve", "--config", "gateway.yaml")
    assert result.returncode == 2
    assert result.stderr.startswith("error: tower.api_key: is not set: export TOWER_API_KEY")


def test_sections_a_command_uses_are_still_checked(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    # A broken jwt section does not concern key management ...
    config.write_text("tower: {local: {db: k.db}}\njwt: {algorithm: XX}\n")
    cfg = load_sections(config, ("tower", "roles"))
    assert cfg.tower.local is not None and cfg.tower.local.db == str(tmp_path / "k.db")
    with pytest.raises(ConfigError) as exc:
        load_config(config, env={})
    assert exc.value.path == "jwt.algorithm"
    # ... but its own sections, `${VAR}` in them and unknown top-level keys are checked.
    config.write_text("tower: {local: {db: k.db, prefix: BAD}}\n")
    with pytest.raises(ConfigError) as exc:
        load_sections(config, ("tower", "roles"))
    assert exc.value.path == "tower.local.prefix"
    config.write_text("tower: {local: {db: '${NO_SUCH_VARIABLE_X}'}}\n")
    with pytest.raises(ConfigError) as exc:
        load_sections(config, ("tower",), env={})
    assert exc.value.path == "tower.local.db"
    config.write_text("tower: {local: {db: k.db}}\nbogus: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_sections(config, ("tower",))
    assert exc.value.path == "bogus"


def test_serve_still_demands_the_jwt_secret(shipped: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(shipped / "gateway.yaml", env={})
    assert exc.value.path == "jwt.secret"


def test_check_config_on_the_shipped_file_says_how_to_set_what_is_missing(
    shipped: Path,
) -> None:
    env = fresh_env()
    result = _cli(shipped, env, "check-config", "--config", "gateway.yaml")
    assert result.returncode == 2
    first, hint = result.stderr.splitlines()[:2]
    assert first.startswith("error: jwt.secret:") and "GATEWAY_JWT_SECRET" in first
    assert hint.startswith("hint: export GATEWAY_JWT_SECRET=")
    # The hint is a working shell command: run it as printed, and the config is valid.
    command = hint.removeprefix("hint: ").split("  (")[0]
    shell = f"{command} && {sys.executable} -m gateway check-config --config gateway.yaml"
    fixed = subprocess.run(
        ["sh", "-c", shell], cwd=shipped, env=env, capture_output=True, text=True, timeout=60
    )
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.startswith("ok: 3 route(s), local tower ")
