"""A fresh machine for tests that run commands as a new user would: free ports, an
environment with none of the gateway's variables set."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fresh_env(**extra: str) -> dict[str, str]:
    """The current environment without any GATEWAY_*, TOWER_* or DEMO_* variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "TOWER_", "DEMO_"))}
    env.update(extra)
    return env
