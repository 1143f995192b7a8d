"""The container layout without a container: the installed package run as uid 10001 (the
image's user) with a read-only, root-owned config directory and a writable data directory.

The embedded tower's database and `<db>.secret` go to the data directory
($TOWER_GATEWAY_DATA_DIR; /var/lib/tower-gateway in the image), `keys` and `serve`
work there, and the config directory stays untouched. The test runs as root and drops
privileges in each subprocess: the interpreter starts as root, imports the package and
everything it loads lazily, then calls setgid/setuid(10001) before running the command (on
this machine the interpreter itself lives under /root, which uid 10001 cannot read, so
`setpriv ... python` would find no standard library; in the image it lives in /usr/local).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from tests.fresh import free_port, fresh_env

ROOT = Path(__file__).resolve().parent.parent
UID = 10001  # the Dockerfile's USER

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (and setpriv) to run a subprocess as an unprivileged user",
)

# Runs `tower-gateway ARGS` as UID: every gateway module (and what the commands import
# lazily) is loaded first, while the interpreter's own files are still readable.
LAUNCHER = f"""
import importlib, os, pkgutil, sys
import gateway
for module in pkgutil.walk_packages(gateway.__path__, "gateway."):
    if module.name != "gateway.__main__":
        importlib.import_module(module.name)
import redis.asyncio, sqlite3, http.cookies, aiohttp.web
import encodings.idna, encodings.ascii, encodings.latin_1
os.setgroups([])
os.setgid({UID})
os.setuid({UID})
assert os.getuid() == os.geteuid() == {UID}
from gateway.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def layout() -> Iterator[tuple[Path, Path]]:
    """(config directory, data directory) as in the image: /etc/tower-gateway is root's and
    read-only for the gateway, the data directory belongs to uid 10001."""
    # Not under pytest's tmp_path: its parents are private to root.
    top = Path(tempfile.mkdtemp(prefix="tower-gateway-layout-"))
    try:
        top.chmod(0o755)
        etc, data = top / "etc", top / "data"
        etc.mkdir(mode=0o755)
        (etc / "gateway.yaml").write_text((ROOT / "gateway.yaml").read_text())
        data.mkdir(mode=0o700)
        os.chown(data, UID, UID)
        yield etc, data
    finally:
        shutil.rmtree(top)


def _as_user(argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", *argv]


def _gateway_argv(*argv: str) -> list[str]:
    return [sys.executable, "-c", LAUNCHER, *argv]


def _env(data: Path | None, **extra: str) -> dict[str, str]:
    env = fresh_env(HOME="/nonexistent", **extra)
    if data is not None:
        env["TOWER_GATEWAY_DATA_DIR"] = str(data)
    return env


def _gateway(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _gateway_argv(*argv),
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_config_directory_is_read_only_for_the_gateway_user(
    layout: tuple[Path, Path],
) -> None:
    etc, _data = layout
    probe = subprocess.run(
        _as_user(["sh", "-c", f"touch {etc}/probe"]), capture_output=True, timeout=30
    )
    assert probe.returncode != 0  # the premise of every test below


def test_keys_and_serve_keep_their_state_in_the_data_directory(
    layout: tuple[Path, Path],
) -> None:
    etc, data = layout
    config = str(etc / "gateway.yaml")
    env = _env(data)
    created = _gateway(
        env, "keys", "create", "--config", config, "--user-id", "alice", "--role", "operator"
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]
    assert sorted(p.name for p in etc.iterdir()) == ["gateway.yaml"]
    secret = data / "tower-gateway.db.secret"
    assert (data / "tower-gateway.db").stat().st_uid == UID
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600

    checked = _gateway(_env(data, GATEWAY_JWT_SECRET="s" * 40), "check-config", "--config", config)
    assert checked.returncode == 0, checked.stderr
    assert f"local tower {data / 'tower-gateway.db'}" in checked.stdout

    port, ops = free_port(), free_port()
    serve_env = _env(
        data, GATEWAY_JWT_SECRET="s" * 40, GATEWAY_PORT=str(port), GATEWAY_OPS_PORT=str(ops)
    )
    proc = subprocess.Popen(
        _gateway_argv("serve", "--config", config),
        cwd="/",
        env=serve_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        started = proc.stderr.readline()  # the JSON "listening on ..." line, or why not
        assert "listening on" in started, started + proc.stderr.read()
        with httpx.Client(timeout=5) as client:
            # The key created as uid 10001 validates (403: an operator lacks admin:write),
            # an unknown one does not.
            denied = client.get(f"http://127.0.0.1:{port}/admin/users", headers={"X-API-Key": key})
            assert denied.status_code == 403, denied.text
            assert denied.json()["error"] == "missing_capability"
            unknown = client.get(f"http://127.0.0.1:{port}/admin/users", headers={"X-API-Key": "x"})
            assert unknown.status_code in (400, 401)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert sorted(p.name for p in etc.iterdir()) == ["gateway.yaml"]


def test_no_writable_directory_is_a_config_error_that_says_what_to_set(
    layout: tuple[Path, Path],
) -> None:
    etc, _data = layout
    env = _env(None, TOWER_GATEWAY_DATA_DIR=str(etc / "nowhere"))
    result = _gateway(env, "keys", "list", "--config", str(etc / "gateway.yaml"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: tower.local.db: cannot create tower-gateway.db")
    assert "TOWER_GATEWAY_DATA_DIR" in result.stderr
    assert sorted(p.name for p in etc.iterdir()) == ["gateway.yaml"]


def test_a_writable_config_directory_keeps_the_database_beside_the_config(
    tmp_path: Path,
) -> None:
    (tmp_path / "gateway.yaml").write_text("tower: {local: {db: keys.db}}\n")
    env = {"GATEWAY_JWT_SECRET": "s" * 40, "TOWER_GATEWAY_DATA_DIR": str(tmp_path / "data")}
    local = load_config(tmp_path / "gateway.yaml", env=env).tower.local
    assert local is not None and local.db == str(tmp_path / "keys.db")


def test_an_absolute_db_path_is_kept_as_written(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text("tower: {local: {db: /nonexistent/keys.db}}\n")
    env = {"GATEWAY_JWT_SECRET": "s" * 40}
    local = load_config(tmp_path / "gateway.yaml", env=env).tower.local
    assert local is not None and local.db == "/nonexistent/keys.db"
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.yaml", env=env)
