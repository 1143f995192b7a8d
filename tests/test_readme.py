"""The README's shell examples, run as a new user would: a README that stops working fails CI.

Every ```sh block of "Quick start", "Commands", "The embedded tower and its keys" and
"Managing keys" runs
with `sh`, in a copy of the checkout (no databases, no virtualenv: a fresh clone) and an
empty environment (PATH, HOME, TMPDIR and LANG only), bounded in time; long-running
commands are started in a session of their own and stopped through their PID.

What is not run verbatim, and why:
- `python3 -m venv ...`, `. .venv/bin/activate` and `pip install ...` in the quick start:
  these tests already run inside the installed project, and installing it again would
  need the network; the rest of each line runs as written, with the installed
  `tower-gateway` on PATH.
- the quick start's test-suite line (`python -m pytest`): it is this suite.
- ports: the demo's ports are moved with the variables the README documents
  (GATEWAY_PORT, GATEWAY_OPS_PORT, DEMO_UPSTREAM), and the port numbers written in an
  example (`--port 9999`, `GATEWAY_PORT=18080`, ...) are swapped for free ones, so a
  busy machine cannot fail the test.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fresh import free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
INSTALL = re.compile(
    r"^(python3? -m venv\b|(\.|source) \.venv/bin/activate$|(python3? -m )?pip install\b)"
)
# Not part of a fresh clone: local state, caches, virtualenvs.
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "*.db", "*.db-*", "*.db.secret", "__pycache__", "*.egg-info",
    ".*_cache", ".hypothesis", "build", "dist", "results",
)  # fmt: skip

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None, reason="the quick start's curl lines need curl"
)


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def sh_blocks(title: str) -> list[str]:
    return re.findall(r"^ *```sh\n(.*?)^ *```", section(title), flags=re.S | re.M)


def quick_start(kind: str) -> str:
    """The quick start's block that installs and runs the `demo`, moves its `ports`, or
    runs the `tests`."""
    blocks = sh_blocks("Quick start")
    found = {
        "demo": [b for b in blocks if without_install(b) == "tower-gateway demo"],
        "ports": [b for b in blocks if "GATEWAY_PORT=" in b],
        "tests": [b for b in blocks if "python -m pytest" in b],
    }[kind]
    assert len(found) == 1, blocks
    return found[0]


def without_install(block: str) -> str:
    """The block with the install steps of each `&&` chain dropped (see the module doc)."""
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        steps = [s.strip() for s in line.split("&&")]
        kept = [s for s in steps if not INSTALL.match(s)]
        if kept:
            lines.append(" && ".join(kept))
    return "\n".join(lines)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A fresh clone, as far as the examples can tell."""
    copy = tmp_path / "tower-gateway"
    shutil.copytree(ROOT, copy, ignore=IGNORE)
    return copy


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An empty environment with the installed `tower-gateway` on PATH."""
    installed = shutil.which("tower-gateway")
    assert installed is not None, "the project is not installed"
    bins = [str(Path(installed).parent), str(Path(sys.executable).parent)]
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    return {
        "PATH": os.pathsep.join([*dict.fromkeys(bins), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": str(tmp_path / "home"),
        "TMPDIR": str(tmp_path / "tmp"),
        "LANG": "C.UTF-8",
    }


def run_sh(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-ec", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


class Background:
    """A long-running example: `sh -ec script` with its last command run by `exec`, so the
    PID is the command's own (signalled, and its exit status checked); its own session, so
    nothing it started outlives the test; stdout read line by line with a deadline."""

    def __init__(self, script: str, cwd: Path, env: dict[str, str]) -> None:
        *before, last = script.strip().splitlines()
        if re.match(r"[A-Za-z_][A-Za-z0-9_]*=", last):  # `VAR=x cmd`: `exec` takes no VAR=x
            last = f"env {last}"
        self.proc = subprocess.Popen(
            ["sh", "-ec", "\n".join([*before, f"exec {last}"])],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read_until(self, pattern: str, timeout: float = 60) -> list[str]:
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in seen[-1:]):
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                assert self.proc.stderr is not None
                raise AssertionError("".join(seen) + self.proc.stderr.read())
            seen.append(line)
        return seen

    def stop(self, sig: signal.Signals) -> int:
        """Signal the command by its PID and wait for its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@pytest.fixture
def background() -> Iterator[list[Background]]:
    started: list[Background] = []
    yield started
    for job in started:
        if job.proc.poll() is None:  # a failed test: stop the session this PID leads
            os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait(timeout=30)
        job.reader.join(timeout=30)
        for pipe in (job.proc.stdout, job.proc.stderr):
            if pipe is not None:
                pipe.close()


def keys(checkout: Path, env: dict[str, str]) -> list[dict[str, object]]:
    listed = run_sh("tower-gateway keys list --config gateway.yaml --json", checkout, env)
    assert listed.returncode == 0, listed.stderr
    result: list[dict[str, object]] = json.loads(listed.stdout)
    return result


def check_demo(demo: Background, ports: tuple[int, int, int], env: dict[str, str]) -> None:
    """The banner names the ports, and the `curl` lines it prints work as printed."""
    banner = "".join(demo.read_until(r"^tk_test_"))
    for port in ports:
        assert f"127.0.0.1:{port}" in banner, banner
    assert not [line for line in banner.splitlines() if line.startswith("{")], banner
    curls = [line.strip() for line in banner.splitlines() if line.strip().startswith("curl ")]
    assert len(curls) >= 4, banner
    outputs = []
    for line in curls:
        done = subprocess.run(
            ["sh", "-c", line], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, (line, done.stderr)
        outputs.append(done.stdout)
    assert '"sub": "demo-user"' in outputs[0]  # 200: the upstream's echo of the JWT
    assert json.loads(outputs[1])["error"] == "missing_key"  # 401
    assert json.loads(outputs[2])["error"] == "missing_capability"  # 403
    assert "tower_gateway_cache" in outputs[3]


def test_the_quick_start_blocks_are_the_ones_this_test_knows() -> None:
    # Each block is run below, but for the one that runs the test suite: this very suite.
    blocks = sh_blocks("Quick start")
    assert sorted(blocks) == sorted(quick_start(k) for k in ("demo", "ports", "tests"))


def test_quick_start_demo_works_and_leaves_no_key(
    checkout: Path, env: dict[str, str], background: list[Background]
) -> None:
    ports = (free_port(), free_port(), free_port())
    demo_env = dict(
        env,
        GATEWAY_PORT=str(ports[0]),
        GATEWAY_OPS_PORT=str(ports[1]),
        DEMO_UPSTREAM=f"http://127.0.0.1:{ports[2]}",
    )
    demo = Background(without_install(quick_start("demo")), checkout, demo_env)
    background.append(demo)
    check_demo(demo, ports, env)
    assert demo.stop(signal.SIGINT) == 0
    # What the README promises: no key the demo made, nothing serve would trust.
    assert keys(checkout, env) == []
    assert list(Path(env["TMPDIR"]).iterdir()) == []


def test_quick_start_ports_example_moves_the_ports(
    checkout: Path, env: dict[str, str], background: list[Background]
) -> None:
    script = quick_start("ports")
    written = [int(p) for p in re.findall(r"(?:_PORT=|127\.0\.0\.1:)(\d+)", script)]
    assert len(written) == 3, script
    ports = (free_port(), free_port(), free_port())
    for old, new in zip(written, ports, strict=True):
        script = script.replace(str(old), str(new))
    demo = Background(script, checkout, env)
    background.append(demo)
    check_demo(demo, ports, env)
    assert demo.stop(signal.SIGINT) == 0


def test_commands_check_config_example(checkout: Path, env: dict[str, str]) -> None:
    (block,) = sh_blocks("Commands")
    # As the README says, in an empty environment the shipped file misses its JWT secret ...
    bare = run_sh("tower-gateway check-config --config gateway.yaml", checkout, env)
    assert bare.returncode == 2
    assert bare.stderr.startswith("error: jwt.secret: environment variable GATEWAY_JWT_SECRET")
    assert "hint: export GATEWAY_JWT_SECRET=" in bare.stderr
    # ... and the block sets it.
    done = run_sh(block, checkout, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: 3 route(s), local tower ")


def test_embedded_tower_key_examples(checkout: Path, env: dict[str, str]) -> None:
    blocks = sh_blocks("The embedded tower and its keys")
    assert len(blocks) == 2, blocks
    done = run_sh(blocks[0], checkout, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "never shows a key" not in done.stdout
    listed = keys(checkout, env)
    # alice's key was created, rotated (a new key) and then revoked.
    assert [(k["user_id"], k["revoked_at"] is not None) for k in listed] == [
        ("alice", True),
        ("alice", False),
    ]


def test_embedded_tower_serve_example(
    checkout: Path, env: dict[str, str], background: list[Background]
) -> None:
    script = sh_blocks("The embedded tower and its keys")[1]
    assert "--port 9999" in script
    port = free_port()
    tower = Background(script.replace("--port 9999", f"--port {port}"), checkout, env)
    background.append(tower)
    tower.read_until(rf"^tower listening on http://127\.0\.0\.1:{port}")
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    assert tower.stop(signal.SIGTERM) == 0


def test_managing_keys_example(
    checkout: Path, env: dict[str, str], background: list[Background]
) -> None:
    [script] = sh_blocks("Managing keys")
    assert "OPS=http://127.0.0.1:9091\n" in script
    port, ops = free_port(), free_port()
    serving = {
        **env,
        "GATEWAY_JWT_SECRET": "readme-jwt-secret-" + "j" * 32,
        "GATEWAY_ADMIN_TOKEN": "readme-admin-token-0123456789",
        "GATEWAY_PORT": str(port),
        "GATEWAY_OPS_PORT": str(ops),
    }
    gateway = Background("tower-gateway serve --config gateway.yaml", checkout, serving)
    background.append(gateway)

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{ops}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    deadline = time.monotonic() + 60
    while not up():
        assert gateway.proc.poll() is None and time.monotonic() < deadline, "serve did not start"
        time.sleep(0.1)
    done = run_sh(script.replace(":9091", f":{ops}"), checkout, serving)
    assert done.returncode == 0, done.stdout + done.stderr
    key = done.stderr.strip()
    assert re.fullmatch(r"tk_test_\w+", key), done.stderr
    assert key not in done.stdout  # shown once, where the script put it
    # The proxy knows the old key only inside its grace, which the revocation ended.
    refused = httpx.get(f"http://127.0.0.1:{port}/", headers={"X-API-Key": key}, timeout=10)
    assert refused.status_code == 401
    listed = keys(checkout, env)
    assert [(k["user_id"], k["state"], k["revoke_reason"]) for k in listed] == [
        ("alice", "revoked", "rotated early"),
        ("alice", "active", None),
    ]
    # The new key has the extended expiry; the old one's was cut to its grace end.
    assert listed[1]["expires_at"] > time.time() + 179 * 86400
    assert listed[0]["expires_at"] < time.time() + 25 * 3600
    assert gateway.stop(signal.SIGTERM) == 0
