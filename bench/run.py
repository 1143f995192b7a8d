#!/usr/bin/env python3
"""End-to-end benchmark of tower-gateway against a Python ceiling and nginx, on loopback.

    python bench/run.py [--quick] [--duration S] [--connections C] [--out bench/results]

Stands up, on 127.0.0.1 with free ports: a fast upstream and a fake tower
(bench/servers.py), the gateway (`python -m gateway serve`), a bare aiohttp
forwarder (bench/bare_forwarder.py) and nginx (plain proxy, and `auth_request`
with `proxy_cache` on the auth subrequest). It drives each with wrk for a
bounded time and prints one table: requests/s, p50/p90/p99 latency, the ratio
to the bare forwarder (f) and to nginx auth_request (h), tower calls, cache hit
ratio and the proxy's peak RSS. Then the latency a gateway adds at one
connection, the gateway/bare ratio again from interleaved pairs of short runs
(steady where rows b and f, tens of seconds apart, see the machine's speed
drift), and the memory one cached identity costs (100k keys).

CPU placement (2 cores): the proxy under test runs on core 0; wrk, the upstream
and the fake tower share core 1. Rows are comparable because every proxy gets
the same core to itself; the price is that the load core is shared, so a row
that comes close to row (a) is limited by the upstream and wrk, not by the proxy.
The `--workers 2` row is not pinned (its processes may use both cores). As root,
every process runs at nice -10 so other work on the machine disturbs it less; the
`bg cpu` column shows how much other work there was during each row.

Results: <out>/<timestamp>.json, <out>/latest.json and <out>/latest.png. Every
process started here is stopped on exit, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

BENCH_DIR: Final = Path(__file__).resolve().parent
ROOT: Final = BENCH_DIR.parent
WRK_DIR: Final = BENCH_DIR / "wrk"
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(ROOT))

from pyspy_summary import format_summary, summarize  # noqa: E402

HOST: Final = "127.0.0.1"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
WARM_KEY: Final = "k-999999999"  # warms pools and the cache without touching measured keys
CACHED_KEY: Final = "k-1"
COLD_BASE: Final = 1_000_000_000  # cold keys: k-1000000001, k-1000000002, ...
ZIPF_BASE: Final = 2_000_000_000
MEMORY_BASE: Final = 3_000_000_000
ZIPF_KEYS: Final = 10_000
ZIPF_S: Final = 1.1
MEMORY_TARGET_MB: Final = 150.0
STOP_GRACE: Final = 5.0
BUDGET_MARGIN_S: Final = 20.0  # of --budget, kept for what follows the memory fill
MEMORY_MIN_S: Final = 30.0  # the memory fill gets at least this, whatever the budget says
PAIR_ROW: Final = "pair"  # --rows id that selects only the interleaved gateway/bare pairs


class BenchError(RuntimeError):
    """A part of the benchmark could not run; the message says which and why."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tools


def apt_install(*packages: str) -> bool:
    """Install Debian packages when running as root with apt; True on success."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for refresh in (False, True):
        if refresh:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        say(f"installing {' '.join(packages)} with apt-get ...")
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", *packages], env=env, capture_output=True, check=False
        )
        if done.returncode == 0:
            return True
    return False


def pip_install(package: str) -> bool:
    say(f"installing {package} with pip ...")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", package], capture_output=True, check=False
    )
    return done.returncode == 0


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found is None:
        for folder in ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"):
            candidate = Path(folder) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return found


def ensure_binary(name: str, apt_package: str) -> str | None:
    path = find_binary(name)
    if path is None and apt_install(apt_package):
        path = find_binary(name)
    return path


def ensure_matplotlib() -> bool:
    try:
        import matplotlib
    except ImportError:
        if not pip_install("matplotlib"):
            return False
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return False
    return True


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _child_setup(niceness: int) -> Callable[[], None]:
    def setup() -> None:
        """In the child before exec: its priority, and SIGTERM if the benchmark dies (Linux)."""
        if niceness:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, 0, niceness)
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)

    return setup


class Processes:
    """Every process the benchmark starts, each in its own process group, stopped in reverse."""

    def __init__(self, logdir: Path, taskset: str | None, niceness: int = 0) -> None:
        self.logdir = logdir
        self.taskset = taskset
        self._setup = _child_setup(niceness)
        self._live: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: str | None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        command = list(argv)
        if cpu is not None and self.taskset is not None:
            command = [self.taskset, "-c", cpu, *command]
        path = log or self.logdir / f"{name}.log"
        with path.open("ab") as out:
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if log is None else subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=self._setup,
            )
        self._live.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM) -> None:
        """Signal the process group, wait, then SIGKILL whatever is left of the group and of
        the process tree (gateway workers run in sessions of their own)."""
        tree = [(pid, _start_time(pid)) for pid in process_tree(proc.pid) if pid != proc.pid]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_GRACE)
        # Workers or nginx children may outlive their leader: the group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_GRACE)
        deadline = time.monotonic() + STOP_GRACE
        for pid, started in tree:
            # Same pid and same start time: still the process this benchmark started.
            while _start_time(pid) == started and time.monotonic() < deadline:
                time.sleep(0.05)
            if _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self._live = [(n, p) for n, p in self._live if p is not proc]

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self._live)):
            self.stop(proc)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- /proc


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        if Path(f"/proc/{current}").exists():
            out.append(current)
        todo.extend(children.get(current, ()))
    return out


def _start_time(pid: int) -> int | None:
    """Start time of a live (not zombie) process, in clock ticks since boot."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def status_kb(pid: int, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss(pids: Sequence[int]) -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def rss_mb(pids: Sequence[int], name: str = "VmRSS") -> float:
    return sum(status_kb(pid, name) for pid in pids) / 1024


def _proc_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def _system_busy_ticks() -> int:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = (int(v) for v in fields[:3])
    return user + nice + system


class CpuMeter:
    """CPU used on this machine by processes that are not the benchmark's, in cores.

    Other work on the machine (a test suite, a build) takes cycles from the cores the
    rows are pinned to; this makes that visible next to each row instead of hiding it.
    """

    def _ours(self) -> float:
        live = sum(_proc_ticks(pid) for pid in process_tree(os.getpid()))
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        return live + (reaped.ru_utime + reaped.ru_stime) * CLK_TCK

    def start(self) -> tuple[float, float, float]:
        return time.monotonic(), _system_busy_ticks(), self._ours()

    def foreign_cores(self, started: tuple[float, float, float]) -> float:
        wall = time.monotonic() - started[0]
        busy = _system_busy_ticks() - started[1]
        ours = self._ours() - started[2]
        return max(0.0, (busy - ours) / CLK_TCK / wall) if wall > 0 else 0.0

    def wait_quiet(self, threshold: float, budget: float) -> float:
        """Wait (at most `budget` seconds) until other processes use under `threshold` cores."""
        started = time.monotonic()
        while time.monotonic() - started < budget:
            window = self.start()
            time.sleep(0.5)
            if self.foreign_cores(window) < threshold:
                break
        return time.monotonic() - started


# --------------------------------------------------------------------------- http helpers


def http_get(
    url: str, *, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(
    url: str, proc: subprocess.Popen[bytes], what: str, procs: Processes, timeout: float = 30.0
) -> None:
    """Until `url` answers any HTTP status; fails early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}:\n{procs.log_tail(what)}")
        try:
            http_get(url, timeout=1.0)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise BenchError(f"{what} did not answer {url} within {timeout:g}s:\n{procs.log_tail(what)}")


def metric_total(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of every sample of `name` carrying `labels` (and any others, such as `worker`)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest for w in wanted):
            total += value
    return total


def _label_deltas(
    before: dict[str, float], after: dict[str, float], name: str, label: str
) -> dict[str, int]:
    """Per value of `label`, how much the samples of `name` grew (summed over other labels)."""
    pattern = re.compile(rf'{label}="([^"]*)"')
    out: dict[str, int] = {}
    for key, value in after.items():
        base, _, rest = key.partition("{")
        match = pattern.search(rest)
        if base == name and match:
            grown = int(value - before.get(key, 0.0))
            if grown:
                out[match.group(1)] = out.get(match.group(1), 0) + grown
    return out


def scrape_metrics(ops_url: str) -> dict[str, float]:
    status, body = http_get(ops_url + "/metrics")
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    errors: dict[str, int]
    latency_us: dict[str, float]

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    id: str
    label: str
    auth: bool
    rps: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    requests: int | None = None
    errors: dict[str, int] = field(default_factory=dict)
    vs_bare: float | None = None
    vs_nginx_auth: float | None = None
    tower_calls: int | None = None
    tower_distinct_keys: int | None = None
    hit_ratio: float | None = None
    # "metrics": the gateway's hit/miss counters; "tower": 1 - tower calls / requests
    hit_ratio_source: str | None = None
    jwt_minted: int | None = None
    peak_rss_mb: float | None = None
    foreign_cpu_cores: float | None = None
    proxy_cpu_cores: list[float] = field(default_factory=list)  # per proxy process
    cpu_us_per_request: float | None = None  # proxy CPU time per answered request
    gateway_statuses: dict[str, int] = field(default_factory=dict)  # from its metrics
    auth_outcomes: dict[str, int] = field(default_factory=dict)
    pinned: bool = True
    settle_s: float | None = None  # waited for other processes to quieten before the row
    latency_us: dict[str, float] = field(default_factory=dict)
    error: str | None = None


ROW_ORDER: Final = (
    "a", "b", "b-rl", "b-rl-redis", "b-rl-batched", "b-log", "c", "d", "e", "e-warm", "f", "g",
    "h", "i", "i-cache", "j",
)  # fmt: skip
# Decision mode (i, i-cache, j): the data plane's shared token, sent by the generated config.
DECISION_TOKEN: Final = "bench-decision-token-0123456789"


def gateway_config_keys(section: str) -> set[str]:
    """The keys of one section of the gateway's config, read from its own schema, so the
    generated config also suits a tree that has fewer (or more) settings."""
    import dataclasses

    from gateway import config

    cls = {"log": config.LogConfig, "credentials": config.CredentialsConfig}[section]
    return {f.name for f in dataclasses.fields(cls)}


def bench_env() -> dict[str, str]:
    """The environment of every process the benchmark starts, with fresh secrets."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TOWER_API_KEY": "bench-tower-key-" + secrets.token_hex(8),
        "TOWER_SECRET": "bench-tower-secret-" + secrets.token_hex(8),
        "GATEWAY_JWT_SECRET": secrets.token_hex(32),
        "GATEWAY_ADMIN_TOKEN": "bench-admin-" + secrets.token_hex(12),
        "BENCH_LUA_DIR": str(WRK_DIR),
    }


def log_section(files: Path | None) -> dict[str, object]:
    """Request logging off, so it does not dominate; or, with `files` (a path prefix), on
    and written to files. Keys the gateway's config does not have (an older tree) are left
    out."""
    known = gateway_config_keys("log")
    section: dict[str, object] = {"level": "WARNING", "access": files is not None}
    if files is not None:
        if "file" in known:
            section["file"] = f"{files}-access.log"
        if "audit" in known:
            section["audit"] = f"{files}-audit.log"
    elif "audit" in known:
        section["audit"] = None
    return {k: v for k, v in section.items() if k in known}


def gateway_config(
    upstream_url: str,
    tower_url: str,
    port: int,
    ops_port: int,
    *,
    per_minute: float = 0,
    max_entries: int = 100_000,
    log: dict[str, object] | None = None,
    redis_url: str | None = None,
    limiter_mode: str | None = None,
) -> dict[str, object]:
    """The gateway every row runs: one route needing `execute:read_file` (granted through
    the fake tower's `tools:execute` scope), long cache TTL, no limits unless asked. With
    `redis_url`, shared through Redis, the rate limits in `limiter_mode` (exact or batched)."""
    shared: dict[str, object] = {}
    if redis_url is not None:
        shared = {
            "redis": {"url": redis_url},
            "rate_limit": {
                "default_per_minute": per_minute,
                "backend": "redis",
                "mode": limiter_mode or "exact",
            },
        }
    config: dict[str, object] = {
        "server": {"host": HOST, "port": port, "shutdown_timeout": 2},
        "ops": {"host": HOST, "port": ops_port},
        "tower": {"url": tower_url, "timeout": 5.0},
        "cache": {"ttl": 3600, "max_entries": max_entries},
        "routes": [{"path": "/", "upstream": upstream_url, "require": ["execute:read_file"]}],
        "rate_limit": {"default_per_minute": per_minute},
        # The failed-authentication throttle is limiting too: off, like rate_limit, so
        # thousands of new keys a second from one address (wrk) are measured, not refused.
        **(
            {"credentials": {"failed_auth_per_minute": 0}}
            if "failed_auth_per_minute" in gateway_config_keys("credentials")
            else {}
        ),
        "log": log if log is not None else log_section(None),
    }
    if shared:
        config.update(shared)
        config["cache"] = {
            "ttl": 3600,
            "max_entries": max_entries,
            "fingerprint_secret": secrets.token_hex(32),
        }
    return config


# --------------------------------------------------------------------------- nginx


def nginx_conf(
    tmp: Path,
    *,
    plain_port: int,
    auth_port: int,
    upstream_port: int,
    tower_port: int,
    tower_key: str,
    tower_secret: str,
) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi_temp;
    uwsgi_temp_path {tmp}/uwsgi_temp;
    scgi_temp_path {tmp}/scgi_temp;
    proxy_cache_path {tmp}/auth_cache levels=1:2 keys_zone=auth:16m max_size=256m
                     inactive=10m use_temp_path=off;
    upstream app {{ server {HOST}:{upstream_port}; keepalive 128; }}
    upstream tower {{ server {HOST}:{tower_port}; keepalive 64; }}

    # (g) a plain reverse proxy.
    server {{
        listen {HOST}:{plain_port} backlog=2048;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}

    # (h) auth_request to the tower's /auth, the answer cached per key.
    server {{
        listen {HOST}:{auth_port} backlog=2048;
        location / {{
            auth_request /_auth;
            auth_request_set $user_id $upstream_http_x_user_id;
            auth_request_set $key_id $upstream_http_x_key_id;
            auth_request_set $role $upstream_http_x_role;
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-API-Key "";
            proxy_set_header X-User-Id $user_id;
            proxy_set_header X-Key-Id $key_id;
            proxy_set_header X-Role $role;
        }}
        location = /_auth {{
            internal;
            proxy_pass http://tower/auth;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Authorization "Bearer {tower_key}";
            proxy_set_header X-Tower-Secret "{tower_secret}";
            # The raw key is the cache key here (nginx stores its md5 as the file
            # name and the key itself in the file header); fine on loopback.
            proxy_cache auth;
            proxy_cache_key $http_x_api_key;
            proxy_cache_valid 200 204 300s;
            proxy_cache_valid 401 30s;
            proxy_cache_lock on;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
        }}
    }}
}}
"""


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Proxy:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    ops_url: str | None = None
    # Processes measured with it (decision mode: nginx + the decision listener).
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def pids(self) -> list[int]:
        pids = process_tree(self.proc.pid)
        for other in self.others:
            pids += process_tree(other.pid)
        return pids


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        taskset = find_binary("taskset")
        cores = os.cpu_count() or 1
        self.pinning = not args.no_pin and taskset is not None and cores >= 2
        if not self.pinning:
            say("note: running unpinned (no taskset, fewer than 2 cores, or --no-pin)")
        self.proxy_cpu = args.proxy_cpu if self.pinning else None
        self.load_cpu = args.load_cpu if self.pinning else None
        self.procs = Processes(workdir, taskset, args.nice)
        self.cpu = CpuMeter()
        self.rows: dict[str, Row] = {}
        self.extra: dict[str, Any] = {}
        self.env = bench_env()
        self._wrk_runs = 0
        self.started = time.monotonic()
        self.upstream_url = ""
        self.tower_url = ""
        self.redis_url = ""

    # ------------------------------------------------------------------ infrastructure

    def start_backends(self) -> None:
        up_port, tower_port = free_port(), free_port()
        upstream = self.procs.start(
            "upstream",
            [sys.executable, str(BENCH_DIR / "servers.py"), "upstream", "--port", str(up_port)],
            cpu=self.load_cpu,
            env=self.env,
        )
        tower = self.procs.start(
            "tower",
            [sys.executable, str(BENCH_DIR / "servers.py"), "tower", "--port", str(tower_port)],
            cpu=self.load_cpu,
            env=self.env,
        )
        self.upstream_url = f"http://{HOST}:{up_port}"
        self.tower_url = f"http://{HOST}:{tower_port}"
        self.upstream_port, self.tower_port = up_port, tower_port
        wait_http(self.upstream_url + "/", upstream, "upstream", self.procs)
        wait_http(self.tower_url + "/", tower, "tower", self.procs)

    def redis(self) -> str:
        """A redis-server on the load core, started on first use (the Redis rows)."""
        if self.redis_url:
            return self.redis_url
        binary = find_binary("redis-server")
        if binary is None:
            raise BenchError("redis-server is not installed (apt-get install redis-server)")
        port = free_port()
        argv = [binary, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.workdir)]
        proc = self.procs.start("redis", argv, cpu=self.load_cpu, env=self.env)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("redis-server did not start: " + self.procs.log_tail("redis"))
            time.sleep(0.05)
        self.redis_url = f"redis://{HOST}:{port}/0"
        return self.redis_url

    def tower_count(self) -> dict[str, int]:
        _, body = http_get(self.tower_url + "/count")
        count: dict[str, int] = json.loads(body)
        return count

    def wrk(
        self,
        url: str,
        script: str,
        script_args: Sequence[object] = (),
        *,
        duration: float,
        connections: int | None = None,
        threads: int = 1,
        until: Callable[[], bool] | None = None,
    ) -> WrkResult:
        """One wrk run; `until`, polled while it runs, ends it early (SIGINT: wrk still
        reports, while its own `thread:stop()` leaves the process waiting out -d)."""
        self._wrk_runs += 1
        out = self.workdir / f"wrk-{self._wrk_runs}.out"
        connections = connections or self.args.connections
        argv = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(WRK_DIR / script),
            url,
        ]
        if script_args:
            argv += ["--", *(str(a) for a in script_args)]
        proc = self.procs.start("wrk", argv, cpu=self.load_cpu, env=self.env, log=out)
        try:
            if until is not None:
                while proc.poll() is None and not until():
                    time.sleep(0.25)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            proc.wait(timeout=duration + 60)
        except subprocess.TimeoutExpired:
            self.procs.stop(proc)
            raise BenchError(f"wrk did not finish: {' '.join(argv)}") from None
        self.procs.stop(proc)
        text = out.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("BENCH_JSON "):
                data = json.loads(line[len("BENCH_JSON ") :])
                seconds = data["duration_us"] / 1e6
                return WrkResult(
                    requests=data["requests"],
                    duration_s=seconds,
                    rps=data["requests"] / seconds if seconds else 0.0,
                    errors=data["errors"],
                    latency_us=data["latency_us"],
                )
        raise BenchError(f"wrk printed no result ({' '.join(argv)}):\n{text[-1500:]}")

    @contextlib.contextmanager
    def gateway(
        self,
        name: str,
        *,
        workers: int = 1,
        pinned: bool = True,
        per_minute: float = 0,
        max_entries: int = 100_000,
        logging_on: bool = False,
        limiter_mode: str | None = None,
    ) -> Iterator[Proxy]:
        port, ops_port = free_port(), free_port()
        config = gateway_config(
            self.upstream_url,
            self.tower_url,
            port,
            ops_port,
            per_minute=per_minute,
            max_entries=max_entries,
            log=log_section(self.workdir / name if logging_on else None),
            redis_url=self.redis() if limiter_mode is not None else None,
            limiter_mode=limiter_mode,
        )
        path = self.workdir / f"{name}.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        proc = self.procs.start(name, argv, cpu=self.proxy_cpu if pinned else None, env=self.env)
        proxy = Proxy(name, proc, f"http://{HOST}:{port}", f"http://{HOST}:{ops_port}")
        try:
            wait_http(proxy.url + "/", proc, name, self.procs)
            wait_http(proxy.ops_url + "/healthz", proc, name, self.procs)  # type: ignore[operator]
            yield proxy
        finally:
            self.procs.stop(proc)

    @contextlib.contextmanager
    def bare_forwarder(self) -> Iterator[Proxy]:
        port = free_port()
        proc = self.procs.start(
            "bare",
            [
                sys.executable,
                str(BENCH_DIR / "bare_forwarder.py"),
                "--port",
                str(port),
                "--upstream",
                self.upstream_url,
            ],
            cpu=self.proxy_cpu,
            env=self.env,
        )
        proxy = Proxy("bare", proc, f"http://{HOST}:{port}")
        try:
            wait_http(proxy.url + "/", proc, "bare", self.procs)
            yield proxy
        finally:
            self.procs.stop(proc)

    @contextlib.contextmanager
    def nginx(self, binary: str) -> Iterator[tuple[Proxy, Proxy]]:
        tmp = self.workdir / "nginx"
        tmp.mkdir(exist_ok=True)
        plain, auth = free_port(), free_port()
        (tmp / "nginx.conf").write_text(
            nginx_conf(
                tmp,
                plain_port=plain,
                auth_port=auth,
                upstream_port=self.upstream_port,
                tower_port=self.tower_port,
                tower_key=self.env["TOWER_API_KEY"],
                tower_secret=self.env["TOWER_SECRET"],
            )
        )
        # -e keeps nginx from opening the system error log before reading the config.
        argv = [binary, "-e", str(tmp / "error.log"), "-p", str(tmp) + "/", "-c", "nginx.conf"]
        proc = self.procs.start("nginx", argv, cpu=self.proxy_cpu, env=self.env)
        try:
            wait_http(f"http://{HOST}:{plain}/", proc, "nginx", self.procs)
            wait_http(f"http://{HOST}:{auth}/", proc, "nginx", self.procs)
            yield (
                Proxy("nginx", proc, f"http://{HOST}:{plain}"),
                Proxy("nginx", proc, f"http://{HOST}:{auth}"),
            )
        finally:
            self.procs.stop(proc, sig=signal.SIGQUIT)

    @contextlib.contextmanager
    def decision_plane(self, nginx_binary: str, cache_ttl: float) -> Iterator[tuple[Proxy, Proxy]]:
        """The decision listener (decision-only gateway) and nginx from `tower-gateway
        dataplane nginx`, both on the proxy core: (nginx in front, the listener alone)."""
        name = f"decision-{cache_ttl:g}"
        port, ops_port, listen = free_port(), free_port(), free_port()
        config = gateway_config(self.upstream_url, self.tower_url, port, ops_port)
        config["server"] = {**config["server"], "enabled": False}  # type: ignore[dict-item]
        config["decision"] = {"host": HOST, "port": port, "cache_ttl": cache_ttl,
                              "token": DECISION_TOKEN}  # fmt: skip
        path = self.workdir / f"{name}.yaml"
        path.write_text(json.dumps(config, indent=2))
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
        gateway = self.procs.start(name, argv, cpu=self.proxy_cpu, env=self.env)
        tmp = self.workdir / name
        tmp.mkdir(exist_ok=True)
        try:
            wait_http(f"http://{HOST}:{port}/", gateway, name, self.procs)
            generated = subprocess.run(
                [sys.executable, "-m", "gateway", "dataplane", "nginx", "--config", str(path),
                 "--upstream", self.upstream_url, "--listen", f"{HOST}:{listen}",
                 "--workers", "1"],
                env=self.env, capture_output=True, text=True, check=False, timeout=60,
            )  # fmt: skip
            if generated.returncode != 0:
                raise BenchError(f"dataplane nginx failed: {generated.stderr[-500:]}")
            user = "user root;\n" if os.geteuid() == 0 else ""
            text = generated.stdout.replace("events {", "events {\n    multi_accept on;", 1)
            text = text.replace("    access_log off;", "    access_log off;\n"
                                "    keepalive_requests 1000000;", 1)  # fmt: skip
            (tmp / "nginx.conf").write_text(user + text)
            ngx = [nginx_binary, "-e", str(tmp / "error.log"), "-p", str(tmp) + "/",
                   "-c", "nginx.conf", "-g", "daemon off;"]  # fmt: skip
            proc = self.procs.start(f"nginx-{name}", ngx, cpu=self.proxy_cpu, env=self.env)
            try:
                wait_http(f"http://{HOST}:{listen}/", proc, f"nginx-{name}", self.procs)
                yield (
                    Proxy(f"nginx-{name}", proc, f"http://{HOST}:{listen}", others=[gateway]),
                    Proxy(name, gateway, f"http://{HOST}:{port}"),
                )
            finally:
                self.procs.stop(proc, sig=signal.SIGQUIT)
        finally:
            self.procs.stop(gateway)

    def decision_rows(self, nginx_binary: str | None) -> None:
        """i: nginx + the decision listener deciding every request; i-cache: nginx caching
        allows for 5 s (cache_ttl: 5); j: wrk straight at the listener's /auth."""
        wanted = {"i", "i-cache", "j"}
        if self.args.rows and not wanted & set(self.args.rows):
            return
        if nginx_binary is None:
            for rid in sorted(wanted):
                self.rows[rid] = Row(rid, "decision mode", auth=True, error="nginx not available")
            return
        try:
            with self.decision_plane(nginx_binary, 0) as (front, alone):
                self.run_row(
                    Row("i", "nginx + decision listener, every request decided", auth=True,
                        hit_ratio_source="tower"),
                    lambda r: self.measure(r, front.url, "cached.lua", [CACHED_KEY], proxy=front),
                )  # fmt: skip
                self.run_row(
                    Row("j", "decision listener alone (wrk at /auth)", auth=True,
                        hit_ratio_source="tower"),
                    lambda r: self.measure(
                        r, alone.url, "decision.lua", [CACHED_KEY, DECISION_TOKEN], proxy=alone,
                        sanity_headers={"X-Original-Method": "GET", "X-Original-URI": "/",
                                        "X-Tower-Gateway-Decision-Token": DECISION_TOKEN},
                        sanity_path="/auth",
                    ),
                )  # fmt: skip
            with self.decision_plane(nginx_binary, 5) as (front, _):
                self.run_row(
                    Row("i-cache", "nginx + decision listener, cache_ttl: 5", auth=True,
                        hit_ratio_source="tower"),
                    lambda r: self.measure(r, front.url, "cached.lua", [CACHED_KEY], proxy=front),
                )  # fmt: skip
        except BenchError as exc:
            say(f"decision mode failed: {exc}")
            for rid in sorted(wanted):
                self.rows.setdefault(
                    rid, Row(rid, "decision mode", auth=True, error=str(exc).splitlines()[0])
                )

    # ------------------------------------------------------------------ one row

    def measure(
        self,
        row: Row,
        url: str,
        script: str,
        script_args: Sequence[object] = (),
        *,
        proxy: Proxy | None = None,
        warm_key: str = CACHED_KEY,
        sanity_headers: dict[str, str] | None = None,
        sanity_path: str = "/",
    ) -> Row:
        """Warm up (cached rows on their own key, so the row is all hits; cold and Zipf rows
        on a key they never send), then one measured wrk run with counters around it."""
        self.warm_up(
            url, warm_key, f"row {row.id}", headers=sanity_headers, path=sanity_path,
            script=script, script_args=script_args,
        )  # fmt: skip
        if self.args.settle > 0:
            row.settle_s = round(self.cpu.wait_quiet(self.args.quiet_below, self.args.settle), 1)
        pids = proxy.pids() if proxy is not None else []
        ops = proxy.ops_url if proxy is not None and row.hit_ratio_source == "metrics" else None
        tower_before = self.tower_count()
        metrics_before = scrape_metrics(ops) if ops else {}
        reset_peak_rss(pids)
        cpu = self.cpu.start()
        ticks = {pid: _proc_ticks(pid) for pid in pids}
        result = self.wrk(url, script, script_args, duration=self.args.duration)
        wall = time.monotonic() - cpu[0]
        row.foreign_cpu_cores = round(self.cpu.foreign_cores(cpu), 3)
        if pids:
            # CPU of each proxy process over the row, in cores: 1.0 is a saturated core.
            row.proxy_cpu_cores = [
                round((_proc_ticks(pid) - before) / CLK_TCK / wall, 2)
                for pid, before in ticks.items()
            ]
        if pids:
            row.peak_rss_mb = round(rss_mb(proxy.pids() if proxy else pids, "VmHWM"), 1)
        tower_after = self.tower_count()
        if pids and result.requests:
            # Less sensitive than req/s to other work on the machine taking turns on the core.
            row.cpu_us_per_request = round(
                sum(row.proxy_cpu_cores) * wall / result.requests * 1e6, 1
            )
        row.rps = round(result.rps, 1)
        row.requests = result.requests
        row.errors = result.errors
        row.latency_us = result.latency_us
        row.p50_ms = result.latency_us["p50"] / 1000
        row.p90_ms = result.latency_us["p90"] / 1000
        row.p99_ms = result.latency_us["p99"] / 1000
        if row.auth:
            row.tower_calls = tower_after["calls"] - tower_before["calls"]
            row.tower_distinct_keys = tower_after["distinct"] - tower_before["distinct"]
            if ops:
                metrics_after = scrape_metrics(ops)

                def delta(name: str, **labels: str) -> float:
                    return metric_total(metrics_after, name, **labels) - metric_total(
                        metrics_before, name, **labels
                    )

                row.gateway_statuses = _label_deltas(
                    metrics_before, metrics_after, "tower_gateway_requests_total", "status"
                )
                row.auth_outcomes = _label_deltas(
                    metrics_before, metrics_after, "tower_gateway_auth_total", "outcome"
                )
                hits = delta("tower_gateway_cache_hits_total")
                misses = delta("tower_gateway_cache_misses_total")
                row.hit_ratio = round(hits / (hits + misses), 4) if hits + misses else None
                row.jwt_minted = int(delta("tower_gateway_jwt_tokens_total", origin="minted"))
            elif result.requests:
                row.hit_ratio_source = "tower"
                row.hit_ratio = round(max(0.0, 1 - row.tower_calls / result.requests), 4)
        else:
            row.hit_ratio_source = None
        if result.failed:
            say(
                f"  row {row.id}: {result.failed} failed requests {result.errors}; gateway "
                f"statuses {row.gateway_statuses}, auth outcomes {row.auth_outcomes}"
            )
        return row

    def warm_up(
        self,
        url: str,
        key: str,
        what: str,
        *,
        headers: dict[str, str] | None = None,
        path: str = "/",
        script: str = "cached.lua",
        script_args: Sequence[object] = (),
    ) -> None:
        """One sanity request (fails loudly on anything but 200), then --warmup seconds of
        load on `key`: pools open and the cache holds the key before anything is measured."""
        status, body = http_get(url + path, headers={"X-API-Key": key, **(headers or {})})
        if status != 200:
            raise BenchError(f"{what}: sanity request answered {status}: {body[:200]!r}")
        if script == "decision.lua":
            self.wrk(url, script, [key, *list(script_args)[1:]], duration=self.args.warmup)
            return
        self.wrk(url, "cached.lua", [key], duration=self.args.warmup)

    def run_row(self, row: Row, fn: Callable[[Row], Row]) -> None:
        if self.args.rows and row.id not in self.args.rows:
            return
        say(f"row {row.id}: {row.label} ...")
        try:
            self.rows[row.id] = fn(row)
        except BenchError as exc:
            row.error = str(exc).splitlines()[0][:300]
            say(f"  row {row.id} failed: {exc}")
            self.rows[row.id] = row
        r = self.rows[row.id]
        if r.rps is not None:
            say(f"  {r.rps:,.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms")

    # ------------------------------------------------------------------ the scenarios

    def run(self) -> None:
        self.start_backends()
        up = self.upstream_url

        self.run_row(
            Row("a", "upstream direct (no proxy)", auth=False),
            lambda r: self.measure(r, up, "cached.lua", [CACHED_KEY]),
        )

        def bare(r: Row) -> Row:
            with self.bare_forwarder() as proxy:
                return self.measure(r, proxy.url, "cached.lua", [CACHED_KEY], proxy=proxy)

        self.run_row(Row("f", "bare aiohttp forwarder, no auth (Python ceiling)", auth=False), bare)

        def cached(r: Row) -> Row:
            with self.gateway("gateway-b") as gw:
                self.measure(r, gw.url, "cached.lua", [CACHED_KEY], proxy=gw)
                if not self.args.skip_one_connection:
                    self.one_connection(gw)
                return r

        self.run_row(
            Row("b", "gateway, cached key, 1 worker", auth=True, hit_ratio_source="metrics"), cached
        )

        def limited(r: Row) -> Row:
            # A limit no key reaches: the limiter's cost without any 429.
            with self.gateway("gateway-rl", per_minute=1_000_000) as gw:
                return self.measure(r, gw.url, "cached.lua", [CACHED_KEY], proxy=gw)

        self.run_row(
            Row(
                "b-rl",
                "gateway, cached key, rate limit on (memory)",
                auth=True,
                hit_ratio_source="metrics",
            ),
            limited,
        )

        def shared_limits(mode: str) -> Callable[[Row], Row]:
            # The same limit no key reaches, shared through a redis-server on the load core.
            def row(r: Row) -> Row:
                with self.gateway(
                    f"gateway-rl-{mode}", per_minute=1_000_000, limiter_mode=mode
                ) as gw:
                    return self.measure(r, gw.url, "cached.lua", [CACHED_KEY], proxy=gw)

            return row

        for row_id, mode in (("b-rl-redis", "exact"), ("b-rl-batched", "batched")):
            self.run_row(
                Row(
                    row_id,
                    f"gateway, cached key, rate limit on (redis, {mode})",
                    auth=True,
                    hit_ratio_source="metrics",
                ),
                shared_limits(mode),
            )

        def logged(r: Row) -> Row:
            with self.gateway("gateway-log", logging_on=True) as gw:
                return self.measure(r, gw.url, "cached.lua", [CACHED_KEY], proxy=gw)

        self.run_row(
            Row(
                "b-log",
                "gateway, cached key, access + audit log to files",
                auth=True,
                hit_ratio_source="metrics",
            ),
            logged,
        )

        def workers(r: Row) -> Row:
            with self.gateway("gateway-w2", workers=2, pinned=False) as gw:
                return self.measure(r, gw.url, "cached.lua", [CACHED_KEY], proxy=gw)

        self.run_row(
            Row(
                "c",
                "gateway, cached key, --workers 2 (unpinned)",
                auth=True,
                hit_ratio_source="metrics",
                pinned=False,
            ),
            workers,
        )

        def cold(r: Row) -> Row:
            with self.gateway("gateway-d", max_entries=1_000_000) as gw:
                return self.measure(r, gw.url, "cold.lua", [COLD_BASE], proxy=gw, warm_key=WARM_KEY)

        self.run_row(
            Row(
                "d",
                "gateway, cold keys (a new key every request)",
                auth=True,
                hit_ratio_source="metrics",
            ),
            cold,
        )

        def zipf(r: Row) -> Row:
            with self.gateway("gateway-e") as gw:
                return self.measure(
                    r,
                    gw.url,
                    "zipf.lua",
                    [ZIPF_KEYS, ZIPF_S, ZIPF_BASE],
                    proxy=gw,
                    warm_key=WARM_KEY,
                )

        self.run_row(
            Row(
                "e",
                f"gateway, Zipf(s={ZIPF_S}) over {ZIPF_KEYS // 1000}k keys",
                auth=True,
                hit_ratio_source="metrics",
            ),
            zipf,
        )

        def zipf_warm(r: Row) -> Row:
            # Steady state: every key is validated once (one wrk connection sweeping
            # the ranks in order), then the same Zipf load is measured, as a gateway
            # that has been up for a TTL sees it.
            with self.gateway("gateway-e-warm") as gw:
                before = self.tower_count()["distinct"]
                self.wrk(
                    gw.url,
                    "zipf.lua",
                    [ZIPF_KEYS, ZIPF_S, ZIPF_BASE, "sweep"],
                    duration=max(10.0, min(90.0, ZIPF_KEYS / 200)),
                    connections=8,
                    until=lambda: self.tower_count()["distinct"] - before >= ZIPF_KEYS,
                )
                return self.measure(
                    r,
                    gw.url,
                    "zipf.lua",
                    [ZIPF_KEYS, ZIPF_S, ZIPF_BASE],
                    proxy=gw,
                    warm_key=WARM_KEY,
                )

        self.run_row(
            Row(
                "e-warm",
                f"gateway, Zipf(s={ZIPF_S}) over {ZIPF_KEYS // 1000}k keys, warm cache",
                auth=True,
                hit_ratio_source="metrics",
            ),
            zipf_warm,
        )

        nginx = ensure_binary("nginx", "nginx")
        want_nginx = not self.args.rows or {"g", "h"} & set(self.args.rows)
        if nginx is None:
            for rid, label in (("g", "nginx reverse proxy"), ("h", "nginx auth_request")):
                self.rows[rid] = Row(rid, label, auth=rid == "h", error="nginx not available")
        elif want_nginx:
            try:
                with self.nginx(nginx) as (plain, auth):
                    self.run_row(
                        Row("g", "nginx reverse proxy", auth=False),
                        lambda r: self.measure(
                            r, plain.url, "cached.lua", [CACHED_KEY], proxy=plain
                        ),
                    )
                    self.run_row(
                        Row(
                            "h",
                            "nginx auth_request + proxy_cache, cached key",
                            auth=True,
                            hit_ratio_source="tower",
                        ),
                        lambda r: self.measure(r, auth.url, "cached.lua", [CACHED_KEY], proxy=auth),
                    )
            except BenchError as exc:
                say(f"nginx failed: {exc}")
                for rid in ("g", "h"):
                    self.rows.setdefault(
                        rid, Row(rid, "nginx", auth=rid == "h", error=str(exc).splitlines()[0])
                    )

        self.decision_rows(nginx)

        rows = set(self.args.rows or ())
        if self.args.pairs and (not rows or {"b", "f", PAIR_ROW} & rows):
            try:
                self.paired()
            except BenchError as exc:
                say(f"interleaved pairs failed: {exc}")
                self.extra["paired"] = {"error": str(exc).splitlines()[0]}
        if not self.args.skip_memory:
            try:
                self.memory()
            except BenchError as exc:
                say(f"memory measurement failed: {exc}")
                self.extra["memory"] = {"error": str(exc).splitlines()[0]}
        if self.args.profile:
            for scenario in self.args.profile:
                try:
                    self.profile(scenario)
                except BenchError as exc:
                    say(f"profile failed: {exc}")

        for row in self.rows.values():
            bare_row, nginx_row = self.rows.get("f"), self.rows.get("h")
            if row.rps is not None and bare_row is not None and bare_row.rps:
                row.vs_bare = round(row.rps / bare_row.rps, 3)
            if row.rps is not None and nginx_row is not None and nginx_row.rps:
                row.vs_nginx_auth = round(row.rps / nginx_row.rps, 3)

    def one_connection(self, gw: Proxy) -> None:
        """p50 at one connection, so the number is the gateway's own work, not queueing."""
        say("  one connection: upstream direct vs gateway ...")
        seconds = self.args.one_connection_duration
        direct = self.wrk(
            self.upstream_url, "cached.lua", [CACHED_KEY], duration=seconds, connections=1
        )
        via = self.wrk(gw.url, "cached.lua", [CACHED_KEY], duration=seconds, connections=1)
        self.extra["one_connection"] = {
            "duration_s": seconds,
            "direct": {"rps": round(direct.rps, 1), **direct.latency_us},
            "gateway": {"rps": round(via.rps, 1), **via.latency_us},
            "added_p50_us": via.latency_us["p50"] - direct.latency_us["p50"],
            "added_p99_us": via.latency_us["p99"] - direct.latency_us["p99"],
        }

    def paired(self) -> None:
        """Gateway (as row b) and bare forwarder (as row f) measured in alternating short
        slices, for the b/f ratio.

        Rows b and f are measured tens of seconds apart, and on a shared machine its speed
        drifts over that time: their ratio moved from 0.72 to 0.92 between runs. Here both
        run at once on the proxy core, taking turns under load (only one is loaded at any
        moment), and each pair of slices gives one ratio from two runs seconds apart; the
        order alternates (g,b then b,g) so drift within a pair cancels too. The median over
        pairs is the figure; min-max shows how much the pairs agreed.
        """
        pairs, seconds = self.args.pairs, self.args.pair_seconds
        say(f"interleaved pairs: gateway / bare forwarder, {pairs} x 2 x {seconds}s ...")
        deadline = self._pairs_deadline()
        slices: list[dict[str, Any]] = []
        rps_ratios: list[float] = []
        cpu_ratios: list[float] = []
        with self.gateway("gateway-pair") as gw, self.bare_forwarder() as bare:
            self.warm_up(gw.url, CACHED_KEY, "pairs, gateway")
            self.warm_up(bare.url, CACHED_KEY, "pairs, bare forwarder")
            settle = (
                self.cpu.wait_quiet(self.args.quiet_below, self.args.settle)
                if self.args.settle > 0
                else 0.0
            )
            longest = 0.0
            for pair in range(1, pairs + 1):
                if deadline is not None and slices and time.monotonic() + longest > deadline:
                    say(f"  stopping after {pair - 1} of {pairs} pairs: --budget")
                    break
                started = time.monotonic()
                order = ((gw, "gateway"), (bare, "bare"))
                got = {
                    role: self._pair_slice(proxy, role, pair, seconds)
                    for proxy, role in (order if pair % 2 else order[::-1])
                }
                longest = max(longest, time.monotonic() - started)
                slices += got.values()
                g, b = got["gateway"], got["bare"]
                rps_ratio = g["rps"] / b["rps"]
                cpu_ratio = (
                    b["cpu_us_per_request"] / g["cpu_us_per_request"]
                    if g["cpu_us_per_request"] and b["cpu_us_per_request"]
                    else None
                )
                rps_ratios.append(round(rps_ratio, 3))
                if cpu_ratio is not None:
                    cpu_ratios.append(round(cpu_ratio, 3))
                say(
                    f"  pair {pair} ({'g,b' if pair % 2 else 'b,g'}): gateway {g['rps']:,.0f} "
                    f"req/s {_fmt(g['cpu_us_per_request'], '.0f')} µs/req, bare "
                    f"{b['rps']:,.0f} req/s {_fmt(b['cpu_us_per_request'], '.0f')} µs/req -> "
                    f"req/s {rps_ratio:.2f}, CPU {_fmt(cpu_ratio, '.2f')}"
                )

        def of(role: str, key: str) -> list[float]:
            return [s[key] for s in slices if s["proxy"] == role and s[key] is not None]

        rps_mid, rps_lo, rps_hi = _spread(rps_ratios)
        cpu_mid, cpu_lo, cpu_hi = _spread(cpu_ratios)
        self.extra["paired"] = {
            "pairs": len(rps_ratios),
            "pairs_requested": pairs,
            "slice_s": seconds,
            "rps_ratio_median": rps_mid,
            "rps_ratio_min": rps_lo,
            "rps_ratio_max": rps_hi,
            "cpu_ratio_median": cpu_mid,
            "cpu_ratio_min": cpu_lo,
            "cpu_ratio_max": cpu_hi,
            "gateway_cpu_us_median": _spread(of("gateway", "cpu_us_per_request"), 1)[0],
            "bare_cpu_us_median": _spread(of("bare", "cpu_us_per_request"), 1)[0],
            "gateway_rps_median": _spread(of("gateway", "rps"), 1)[0],
            "bare_rps_median": _spread(of("bare", "rps"), 1)[0],
            "rps_ratios": rps_ratios,
            "cpu_ratios": cpu_ratios,
            "failed_requests": sum(s["failed"] for s in slices),
            "foreign_cpu_cores_max": max(s["foreign_cpu_cores"] for s in slices),
            "settle_s": round(settle, 1),
            "slices": slices,
        }

    def _pairs_deadline(self) -> float | None:
        """When the last pair must end for the run to stay in --budget (None: no budget),
        keeping the memory fill its minimum; the pairs stop early rather than overrun."""
        if not self.args.budget:
            return None
        reserve = BUDGET_MARGIN_S + (0.0 if self.args.skip_memory else MEMORY_MIN_S)
        budget: float = self.args.budget
        return self.started + budget - reserve

    def _pair_slice(self, proxy: Proxy, role: str, pair: int, seconds: float) -> dict[str, Any]:
        """One slice of the interleaved pairs: wrk on the cached key for `seconds`, with the
        proxy's CPU ticks around it, as `measure` counts them."""
        pids = proxy.pids()
        cpu = self.cpu.start()
        ticks = {pid: _proc_ticks(pid) for pid in pids}
        result = self.wrk(proxy.url, "cached.lua", [CACHED_KEY], duration=seconds)
        wall = time.monotonic() - cpu[0]
        used_s = sum(_proc_ticks(pid) - before for pid, before in ticks.items()) / CLK_TCK
        if not result.requests:
            raise BenchError(f"pair {pair}, {role}: no request answered in {seconds:g}s")
        if result.failed:
            say(f"  pair {pair}, {role}: {result.failed} failed requests {result.errors}")
        return {
            "pair": pair,
            "proxy": role,
            "rps": round(result.rps, 1),
            "requests": result.requests,
            "failed": result.failed,
            "cpu_us_per_request": round(used_s / result.requests * 1e6, 1) if used_s else None,
            "proxy_cpu_cores": round(used_s / wall, 2),
            "foreign_cpu_cores": round(self.cpu.foreign_cores(cpu), 3),
            "p50_ms": result.latency_us["p50"] / 1000,
            "p99_ms": result.latency_us["p99"] / 1000,
        }

    def memory(self) -> None:
        """Fill a fresh gateway's cache with N identities; RSS per identity."""
        keys = self.args.memory_keys
        say(f"memory: loading {keys:,} identities into a fresh gateway ...")
        with self.gateway("gateway-mem", max_entries=max(2 * keys, 100_000)) as gw:
            self.wrk(gw.url, "cached.lua", [WARM_KEY], duration=1)
            time.sleep(0.5)
            pids = gw.pids()
            before_mb = rss_mb(pids)
            entries_before = metric_total(
                scrape_metrics(gw.ops_url or ""), "tower_gateway_cache_entries", kind="positive"
            )
            tower_before = self.tower_count()
            started = time.monotonic()
            budget = self.args.memory_timeout
            if self.args.budget:
                # What is left of the whole run's time budget, keeping some for the rest.
                left = self.args.budget - (time.monotonic() - self.started) - BUDGET_MARGIN_S
                budget = max(MEMORY_MIN_S, min(budget, left))

            def loaded() -> bool:
                return self.tower_count()["distinct"] - tower_before["distinct"] >= keys

            result = self.wrk(
                gw.url,
                "cold.lua",
                [MEMORY_BASE, keys],
                duration=budget,
                connections=self.args.memory_connections,
                until=loaded,
            )
            elapsed = time.monotonic() - started
            time.sleep(0.5)
            pids = gw.pids()
            after_mb = rss_mb(pids)
            peak_mb = rss_mb(pids, "VmHWM")
            metrics = scrape_metrics(gw.ops_url or "")
            entries = metric_total(metrics, "tower_gateway_cache_entries", kind="positive")
            _, body = http_get(
                (gw.ops_url or "") + "/admin/cache",
                headers={"Authorization": f"Bearer {self.env['GATEWAY_ADMIN_TOKEN']}"},
            )
            with contextlib.suppress(ValueError):
                self.extra["memory_admin_cache"] = json.loads(body)
            tower_after = self.tower_count()
        added = entries - entries_before
        per_identity = (after_mb - before_mb) * 1024 * 1024 / added if added > 0 else None
        projected = before_mb + per_identity * 100_000 / 1024 / 1024 if per_identity else None
        self.extra["memory"] = {
            "keys_requested": keys,
            "identities_added": int(added),
            "tower_calls": tower_after["calls"] - tower_before["calls"],
            "seconds": round(elapsed, 1),
            "time_bound_s": round(budget, 1),
            "complete": added >= keys,
            "fill_rps": round(result.rps, 1),
            "rss_before_mb": round(before_mb, 1),
            "rss_after_mb": round(after_mb, 1),
            "peak_rss_mb": round(peak_mb, 1),
            "bytes_per_identity": round(per_identity) if per_identity else None,
            "projected_rss_at_100k_mb": round(projected, 1) if projected else None,
            "target_mb": MEMORY_TARGET_MB,
            "within_target": projected is not None and projected < MEMORY_TARGET_MB,
            "failed_requests": result.failed,
        }

    def profile(self, scenario: str) -> None:
        """py-spy on a pinned gateway under load: collapsed stacks, a summary and an SVG."""
        pyspy = find_binary("py-spy")
        if pyspy is None and pip_install("py-spy"):
            pyspy = find_binary("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if pyspy is None or not Path(pyspy).exists():
            raise BenchError("py-spy is not available (pip install py-spy)")
        scripts = {
            "cached": ("cached.lua", [CACHED_KEY]),
            "cold": ("cold.lua", [COLD_BASE + 500_000_000]),
            "zipf": ("zipf.lua", [ZIPF_KEYS, ZIPF_S, ZIPF_BASE]),
            "bare": ("cached.lua", [CACHED_KEY]),  # the bare forwarder, for comparison
        }
        script, script_args = scripts[scenario]
        seconds = self.args.profile_seconds
        out = Path(self.args.out)
        suffix = "" if scenario == "cached" else f"-{scenario}"
        raw, svg = out / f"profile{suffix}.txt", out / f"profile{suffix}.svg"
        say(f"profile ({scenario}): py-spy for 2 x {seconds}s under load ...")
        target = (
            self.bare_forwarder()
            if scenario == "bare"
            else self.gateway(f"gateway-profile-{scenario}", max_entries=1_000_000)
        )
        with target as gw:
            self.wrk(gw.url, "cached.lua", [WARM_KEY], duration=1)
            load = self.procs.start(
                "wrk-profile",
                [
                    "wrk",
                    "-t1",
                    f"-c{self.args.connections}",
                    f"-d{round(2 * seconds + 4)}s",
                    "-s",
                    str(WRK_DIR / script),
                    gw.url,
                    "--",
                    *map(str, script_args),
                ],
                cpu=self.load_cpu,
                env=self.env,
                log=self.workdir / "wrk-profile.out",
            )
            try:
                time.sleep(1)
                for fmt, path in (("raw", raw), ("flamegraph", svg)):
                    argv = [
                        pyspy,
                        "record",
                        "--pid",
                        str(gw.proc.pid),
                        "--duration",
                        str(max(1, round(seconds))),
                        "--rate",
                        "200",
                        "--format",
                        fmt,
                        "-o",
                        str(path),
                    ]
                    spy = self.procs.start("py-spy", argv, cpu=self.load_cpu, env=self.env)
                    spy.wait(timeout=seconds + 30)
                    self.procs.stop(spy)
            finally:
                self.procs.stop(load)
        if not raw.exists():
            raise BenchError(f"py-spy wrote nothing:\n{self.procs.log_tail('py-spy')}")
        summary = summarize(raw)
        self.extra.setdefault("profile", {})[scenario] = {
            "raw": str(raw),
            "svg": str(svg),
            **summary,
        }
        print(
            f"\nprofile ({scenario}, {'bare forwarder' if scenario == 'bare' else 'gateway'} "
            f"under wrk -c{self.args.connections}; "
            f"{summary['samples']} samples, idle excluded):"
        )
        print(format_summary(summary, top=self.args.profile_top))


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _spread(
    values: Sequence[float], digits: int = 3
) -> tuple[float | None, float | None, float | None]:
    """Median, min and max of `values`, rounded (None for each when there are none)."""
    if not values:
        return None, None, None
    return (
        round(statistics.median(values), digits),
        round(min(values), digits),
        round(max(values), digits),
    )


def _cpu(cores: Sequence[float]) -> str:
    """Busy processes only (a gateway's supervisor or nginx's master idle at ~0)."""
    busy = [c for c in cores if c >= 0.05]
    return "+".join(f"{c:.2f}" for c in busy) if busy else "-"


def format_table(rows: dict[str, Row]) -> str:
    header = (
        f"{'row':<5} {'scenario':<49} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} "
        f"{'p99 ms':>7} {'/(f)':>6} {'/(h)':>6} {'tower':>7} {'hit':>7} {'RSS MB':>7} "
        f"{'fail':>5} {'cpu':>9} {'µs/req':>6} {'bg cpu':>6}"
    )
    lines = [header, "-" * len(header)]
    for rid in ROW_ORDER:
        row = rows.get(rid)
        if row is None:
            continue
        if row.error:
            lines.append(f"{rid:<5} {row.label:<49} failed: {row.error[:80]}")
            continue
        hit = _fmt(row.hit_ratio, ".4f")
        if row.hit_ratio is not None and row.hit_ratio_source == "tower":
            hit = "~" + hit[:-1] if row.hit_ratio < 1 else "~1.000"
        fails = sum(row.errors.values()) if row.errors else 0
        lines.append(
            f"{rid:<5} {row.label[:49]:<49} {_fmt(row.rps, ',.0f'):>8} "
            f"{_fmt(row.p50_ms, '.2f'):>7} {_fmt(row.p90_ms, '.2f'):>7} "
            f"{_fmt(row.p99_ms, '.2f'):>7} {_fmt(row.vs_bare, '.2f'):>6} "
            f"{_fmt(row.vs_nginx_auth, '.2f'):>6} {_fmt(row.tower_calls, ',d'):>7} {hit:>7} "
            f"{_fmt(row.peak_rss_mb, '.1f'):>7} {fails:>5} {_cpu(row.proxy_cpu_cores):>9} "
            f"{_fmt(row.cpu_us_per_request, '.0f'):>6} {_fmt(row.foreign_cpu_cores, '.2f'):>6}"
        )
    return "\n".join(lines)


def format_extra(extra: dict[str, Any], rows: dict[str, Row]) -> str:
    lines = []
    one = extra.get("one_connection")
    if one:
        lines.append(
            f"one connection (wrk -t1 -c1, {one['duration_s']:g}s): p50 direct "
            f"{one['direct']['p50'] / 1000:.3f} ms, via gateway {one['gateway']['p50'] / 1000:.3f}"
            f" ms -> added p50 {one['added_p50_us'] / 1000:.3f} ms "
            f"(added p99 {one['added_p99_us'] / 1000:.3f} ms; "
            f"{one['direct']['rps']:,.0f} vs {one['gateway']['rps']:,.0f} req/s)"
        )
    mem = extra.get("memory")
    if mem and "error" not in mem:
        per = mem["bytes_per_identity"]
        lines.append(
            (
                ""
                if mem["complete"]
                else f"memory: fill cut short by its {mem['time_bound_s']:g}s bound (cold path too "
                "slow); the projection extrapolates from what was loaded\n"
            )
            + f"memory: {mem['identities_added']:,} identities cached "
            f"({mem['tower_calls']:,} tower calls, {mem['seconds']:g}s at "
            f"{mem['fill_rps']:,.0f} req/s): RSS {mem['rss_before_mb']:.1f} -> "
            f"{mem['rss_after_mb']:.1f} MB (peak {mem['peak_rss_mb']:.1f}), "
            f"{_fmt(per, ',d')} bytes per identity; projected at 100k: "
            f"{_fmt(mem['projected_rss_at_100k_mb'], '.1f')} MB "
            f"(target < {mem['target_mb']:g} MB: {'met' if mem['within_target'] else 'NOT met'})"
        )
    elif mem:
        lines.append(f"memory: failed: {mem['error']}")
    b, f, c, d = rows.get("b"), rows.get("f"), rows.get("c"), rows.get("d")
    if b and f and b.rps and f.rps:
        by_cpu = (
            f"; by CPU per request {f.cpu_us_per_request / b.cpu_us_per_request:.2f} "
            f"({b.cpu_us_per_request:.0f} vs {f.cpu_us_per_request:.0f} µs)"
            if b.cpu_us_per_request and f.cpu_us_per_request
            else ""
        )
        lines.append(f"gateway (b) / bare forwarder (f): req/s {b.rps / f.rps:.2f}{by_cpu}")
    pairs = extra.get("paired")
    if pairs:
        lines.append(format_pairs(pairs))
    if b and c and b.rps and c.rps:
        lines.append(f"--workers 2 speedup (c)/(b): {c.rps / b.rps:.2f}x")
    if d and d.rps and d.tower_calls is not None:
        lines.append(
            f"cold keys (d): {d.requests:,} answered, {d.tower_calls:,} tower calls, "
            f"{d.tower_distinct_keys:,} distinct keys at the tower "
            f"(in flight at the end are sent but not counted as answered)"
        )
    busy = [r.id for r in rows.values() if (r.foreign_cpu_cores or 0) > 0.1]
    if busy:
        lines.append(
            f"warning: other processes used > 0.1 core during rows {', '.join(busy)} "
            "('bg cpu' column): those rows are pessimistic"
        )
    lines.append(
        "columns: /(f), /(h) = req/s relative to the bare forwarder and to nginx auth_request; "
        "tower = tower calls during the row; hit = cache hit ratio from the gateway's counters "
        "(~ = 1 - tower calls / requests); RSS = peak RSS of the proxy processes; "
        "cpu = cores used by each busy proxy process; µs/req = proxy CPU time per request; "
        "bg cpu = cores used by processes outside the benchmark"
    )
    return "\n".join(lines)


def format_pairs(pairs: dict[str, Any]) -> str:
    """The interleaved gateway/bare figure: medians over pairs, with the range across them."""
    if "error" in pairs:
        return f"gateway / bare forwarder, interleaved pairs: failed: {pairs['error']}"
    if not pairs["pairs"]:
        return "gateway / bare forwarder, interleaved pairs: no pair measured"
    by_cpu = (
        f"; by CPU per request median {pairs['cpu_ratio_median']:.2f} "
        f"({pairs['cpu_ratio_min']:.2f}-{pairs['cpu_ratio_max']:.2f}) (gateway "
        f"{pairs['gateway_cpu_us_median']:.0f} vs bare {pairs['bare_cpu_us_median']:.0f} µs)"
        if pairs["cpu_ratio_median"] is not None
        else ""
    )
    notes = [
        f"{pairs['pairs']} of {pairs['pairs_requested']} pairs (--budget)"
        if pairs["pairs"] < pairs["pairs_requested"]
        else "",
        f"{pairs['failed_requests']:,} failed requests" if pairs["failed_requests"] else "",
        f"other processes used up to {pairs['foreign_cpu_cores_max']:.2f} core"
        if pairs["foreign_cpu_cores_max"] > 0.1
        else "",
    ]
    note = "; ".join(n for n in notes if n)
    return (
        f"gateway / bare forwarder, interleaved {pairs['pairs']} x {pairs['slice_s']:g} s "
        f"pairs: req/s ratio median {pairs['rps_ratio_median']:.2f} "
        f"({pairs['rps_ratio_min']:.2f}-{pairs['rps_ratio_max']:.2f}){by_cpu} "
        f"(gateway {pairs['gateway_rps_median']:,.0f} vs bare {pairs['bare_rps_median']:,.0f} "
        "req/s)" + (f" [{note}]" if note else "")
    )


def write_chart(rows: dict[str, Row], path: Path) -> bool:
    if not ensure_matplotlib():
        say("matplotlib is not available: no chart (pip install matplotlib)")
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [rows[r] for r in ROW_ORDER if r in rows and rows[r].p50_ms is not None]
    if not shown:
        return False
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(shown)), 5.5))
    width = 0.27
    for i, (name, color) in enumerate((("p50", "#4c72b0"), ("p90", "#dd8452"), ("p99", "#c44e52"))):
        values = [getattr(r, f"{name}_ms") for r in shown]
        ax.bar(
            [x + (i - 1) * width for x in range(len(shown))], values, width, label=name, color=color
        )
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels(
        [f"({r.id})\n{_short_label(r)}\n{r.rps:,.0f} req/s" for r in shown], fontsize=8
    )
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend()
    ax.set_title("tower-gateway benchmark: latency per scenario (wrk, loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _short_label(row: Row) -> str:
    return {
        "a": "upstream",
        "b": "gateway\ncached",
        "b-log": "gateway\n+logging",
        "b-rl": "gateway\n+rate limit",
        "b-rl-redis": "gateway\n+redis limit",
        "b-rl-batched": "gateway\n+batched limit",
        "c": "gateway\n2 workers",
        "d": "gateway\ncold keys",
        "e": "gateway\nZipf 10k",
        "e-warm": "gateway\nZipf warm",
        "f": "bare\naiohttp",
        "g": "nginx",
        "h": "nginx\nauth_request",
    }.get(row.id, row.id)


def _version(argv: Sequence[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[0] if text else ""
    return ""


def metadata(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    import aiohttp

    nginx = find_binary("nginx")
    commit = _version(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    cpu_model = ""
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu_model = match.group(1) if match else ""
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "wrk": _version(["wrk", "--version"]),
        "nginx": _version([nginx, "-v"]) if nginx else None,
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "pinning": {"proxy": bench.proxy_cpu, "load (wrk, upstream, tower)": bench.load_cpu}
        if bench.pinning
        else None,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "wrk_threads": 1,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="End-to-end benchmark of tower-gateway (loopback, bounded in time)."
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 s rows, 20k identities for the memory measurement"
    )
    parser.add_argument("--duration", type=float, help="seconds per row (default 10; quick 3)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per row (default 1)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"), help="results folder")
    parser.add_argument(
        "--rows",
        help="only these rows, comma-separated (a,b,b-rl,b-rl-redis,b-rl-batched,b-log,c,d,e,"
        "e-warm,f,g,h,i,i-cache,j); "
        f"{PAIR_ROW!r} = the interleaved gateway/bare pairs, which also run with b or f",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        help="interleaved gateway/bare forwarder pairs of slices for the b/f ratio "
        "(5; quick 3; 0 = none)",
    )
    parser.add_argument(
        "--pair-seconds",
        type=int,
        help="seconds of wrk per slice of a pair (3; quick 2)",
    )
    parser.add_argument(
        "--memory-keys",
        type=int,
        help="identities loaded for the memory measurement (100000; quick 20000)",
    )
    parser.add_argument(
        "--memory-connections",
        type=int,
        default=8,
        help="wrk connections while filling the cache (8)",
    )
    parser.add_argument(
        "--memory-timeout",
        type=float,
        default=150.0,
        help="upper bound in seconds on filling the cache (150); when the "
        "fill is cut short, bytes per identity come from what was loaded",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=330.0,
        help="seconds the whole run should take at most; the interleaved pairs stop "
        "early rather than leave the memory fill under its minimum, and the memory fill "
        "gets what the rows and pairs leave (330; 0 = no budget)",
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-one-connection", action="store_true")
    parser.add_argument(
        "--one-connection-duration",
        type=float,
        help="seconds for each one-connection run (5; quick 2)",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="cached",
        help="also run py-spy under load: cached, cold, zipf (the gateway), bare (the bare "
        "forwarder, for comparison); comma-separated, default cached",
    )
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    parser.add_argument("--profile-top", type=int, default=20)
    parser.add_argument("--proxy-cpu", default="0", help="core for the proxy under test (0)")
    parser.add_argument(
        "--load-cpu", default="1", help="core for wrk, the upstream and the tower (1)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument(
        "--nice",
        type=int,
        default=-10 if os.geteuid() == 0 else 0,
        help="nice value of every benchmark process, so other work on the "
        "machine disturbs the rows less (-10 as root, else 0)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="before each row, wait up to this many seconds for other "
        "processes to use under --quiet-below cores (3; 0 = never)",
    )
    parser.add_argument("--quiet-below", type=float, default=0.15)
    args = parser.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else 1.0
    args.memory_keys = args.memory_keys or (20_000 if args.quick else 100_000)
    args.one_connection_duration = args.one_connection_duration or (2.0 if args.quick else 5.0)
    args.rows = [r.strip() for r in args.rows.split(",")] if args.rows else None
    args.pairs = args.pairs if args.pairs is not None else (3 if args.quick else 5)
    args.pair_seconds = args.pair_seconds or (2 if args.quick else 3)
    if args.pairs < 0 or args.pair_seconds < 1:
        parser.error("--pairs must be 0 or more and --pair-seconds at least 1")
    args.profile = [p.strip() for p in args.profile.split(",")] if args.profile else None
    for scenario in args.profile or ():
        if scenario not in ("cached", "cold", "zipf", "bare"):
            parser.error(f"--profile: unknown scenario {scenario!r}")
    if args.connections < 1 or args.duration <= 0:
        parser.error("--connections and --duration must be positive")
    return args


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if ensure_binary("wrk", "wrk") is None:
        say("error: wrk is not installed and could not be installed (apt-get install wrk)")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Also when started in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tower-gateway-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        interrupted = False
        try:
            bench.run()
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: stopping every process ...")
        except BenchError as exc:
            say(f"error: {exc}")
            interrupted = True
        finally:
            bench.procs.stop_all()
            if interrupted:
                logs = out / "last-failure-logs"
                shutil.rmtree(logs, ignore_errors=True)
                shutil.copytree(
                    tmp,
                    logs,
                    ignore=shutil.ignore_patterns("auth_cache", "*_temp"),
                    dirs_exist_ok=True,
                )
                say(f"process logs kept in {logs}")
        if interrupted:
            return 130
        report = {
            "meta": metadata(args, bench),
            "rows": {rid: asdict(bench.rows[rid]) for rid in ROW_ORDER if rid in bench.rows},
            **bench.extra,
            "elapsed_s": round(time.monotonic() - started, 1),
        }
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = json.dumps(report, indent=2)
    (out / f"{stamp}.json").write_text(text)
    chart = False
    if bench.rows:  # a profile-only run leaves the last table's latest.* alone
        (out / "latest.json").write_text(text)
        chart = write_chart(bench.rows, out / "latest.png")
        if chart:
            shutil.copyfile(out / "latest.png", out / f"{stamp}.png")
    meta = report["meta"]
    pin = meta["pinning"]
    print()
    print(
        f"tower-gateway benchmark  {meta['timestamp']}  commit {meta['commit'][:12]}  "
        f"{meta['cores']} cores ({meta['cpu']}), "
        + (
            f"proxy on core {pin['proxy']}, wrk+upstream+tower on core "
            f"{pin['load (wrk, upstream, tower)']}"
            if pin
            else "unpinned"
        )
        + f"; wrk -t1 -c{args.connections}"
        + (f", {args.duration:g}s per row after {args.warmup:g}s warm-up" if bench.rows else "")
    )
    if bench.rows:
        print(format_table(bench.rows))
        print()
    print(format_extra(bench.extra, bench.rows))
    print(
        f"\nresults: {out / (stamp + '.json')}"
        + (f", {out / 'latest.json'}" if bench.rows else "")
        + (f", {out / 'latest.png'}" if chart else "")
        + f"  (total {report['elapsed_s']:g}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
