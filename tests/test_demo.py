"""The embedded default: `tower-gateway demo` and the shipped gateway.yaml."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    # Only hashes are stored: the database exists beside its hash secret.
    assert (tmp_path / "tower-gateway.db").is_file()
    assert (tmp_path / "tower-gateway.db.secret").is_file()
