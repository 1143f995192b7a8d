"""The embedded default: `tower-gateway demo` and the shipped gateway.yaml."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.fresh import free_port, fresh_env

ROOT = Path(__file__).resolve().parent.parent


def test_root_gateway_yaml_is_the_packaged_default() -> None:
    root = (ROOT / "gateway.yaml").read_text()
    packaged = (ROOT / "gateway" / "default.yaml").read_text()
    assert root == packaged


def test_demo_self_test_serves_the_printed_requests(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GATEWAY_JWT_SECRET", "GATEWAY_ADMIN_TOKEN", "TOWER_GATEWAY_CONFIG")
    }
    upstream = free_port()
    env.update(
        GATEWAY_PORT=str(free_port()),
        GATEWAY_OPS_PORT=str(free_port()),
        DEMO_UPSTREAM=f"http://127.0.0.1:{upstream}",
    )
    # Run from an empty directory: the built-in copy of gateway.yaml is used.
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--self-test"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GET /hello -> 200" in result.stdout
    assert "GET /hello -> 401" in result.stdout
    assert "GET /admin/users -> 403" in result.stdout
    # The demo upstream verified the JWT it received and showed its claims.
    assert "upstream verified the JWT: true" in result.stdout
    assert '"sub": "demo-user"' in result.stdout
    # The banner and result lines are the whole of stdout; the JSON request and audit
    # lines went to stderr.
    assert not [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert '"type": "access"' in result.stderr
    # The demo's key lived in a database of its own, gone with it.
    assert list(tmp_path.iterdir()) == []


def _demo_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh shell, its temporary files under `tmp_path/tmp`."""
    (tmp_path / "tmp").mkdir()
    return fresh_env(TMPDIR=str(tmp_path / "tmp"))


def _keys(cwd: Path, env: dict[str, str]) -> list[dict[str, object]]:
    listing = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "list", "--config", "gateway.yaml", "--json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    keys: list[dict[str, object]] = json.loads(listing.stdout)
    return keys


def test_demo_leaves_no_key_that_serve_would_trust(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "gateway.yaml").write_text((ROOT / "gateway.yaml").read_text())
    env = _demo_env(tmp_path)
    ports = [free_port() for _ in range(3)]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "demo",
            "--port",
            str(ports[0]),
            "--ops-port",
            str(ports[1]),
            "--upstream-port",
            str(ports[2]),
        ],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner.append(line)
            if line.startswith("tk_test_"):
                break
        text = "".join(banner)
        assert banner and banner[-1].startswith("tk_test_"), text
        # The ports it uses, moved by the flags, are in the banner.
        for port in ports:
            assert f"127.0.0.1:{port}" in text
        # While it runs its key is in a database of its own, not the one beside the config.
        assert _keys(work, env) == []
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert _keys(work, env) == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_demo_that_cannot_listen_writes_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = _demo_env(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "demo",
                "--port",
                str(port),
                "--ops-port",
                str(free_port()),
                "--upstream-port",
                str(free_port()),
            ],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr and str(port) in result.stderr
    assert "tk_test_" not in result.stdout + result.stderr
    assert list(work.iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []
