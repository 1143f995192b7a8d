"""Item 4: path tricks. The policy is decided on exactly the path the upstream receives:
each case asserts the pair (the route whose policy applied, the path the upstream saw),
over raw sockets so that no client library normalises the request target first.

Routes: /public (no key), /admin (admin:write), /tools, /slow, / (any valid key).
"""

from __future__ import annotations

import pytest

from tests.conftest import GatewayFactory, Harness
from tests.security.conftest import ADMIN, RecordingLog, add_keys, exchange

# target -> (route name, path the upstream receives)
ROUTED = {
    "/public/../admin": ("admin", "/admin"),
    "/public/%2e%2e/admin": ("admin", "/admin"),
    "/public/%2E%2E/admin": ("admin", "/admin"),
    "/public/.%2e/admin": ("admin", "/admin"),
    "/public/./../admin/": ("admin", "/admin/"),
    "/tools/../admin/x": ("admin", "/admin/x"),
    "/admin/%2e": ("admin", "/admin/"),
    "//admin": ("admin", "/admin"),
    "///admin//x": ("admin", "/admin/x"),
    "/%61dmin": ("admin", "/admin"),
    "/%61%64%6d%69%6e/x": ("admin", "/admin/x"),
    "/admin;x=1": ("admin", "/admin;x=1"),
    "/admin;x=1/y": ("admin", "/admin;x=1/y"),
    "/public;x/../admin": ("admin", "/admin"),
    "/admin;/../public": ("public", "/public"),
    "/admin?next=/../public": ("admin", "/admin?next=/../public"),
    "/public?/../admin": ("public", "/public?/../admin"),
    # An encoded slash stays encoded, so these are one segment, not a climb.
    # Trailing dots, case and double encoding are different names, not aliases.
    "/admin.": ("root", "/admin."),
    "/admin..": ("root", "/admin.."),
    "/admin./x": ("root", "/admin./x"),
    "/ADMIN": ("root", "/ADMIN"),
    "/Admin/x": ("root", "/Admin/x"),
    "/%41DMIN": ("root", "/ADMIN"),
    "/%2561dmin": ("root", "/%2561dmin"),
    "/administrator": ("root", "/administrator"),
    "/admin%20": ("root", "/admin%20"),
    "/%EF%BD%81dmin": ("root", "/%EF%BD%81dmin"),  # fullwidth a
    # No authority hides in a path: the upstream URL is always its origin + this path.
    "//evil.example@gw/admin": ("root", "/evil.example@gw/admin"),
}

REFUSED = [
    "/public/..;/admin",
    "/public/.;/admin",
    "/public/%2e%2e;/admin",
    "/public\\..\\admin",
    "/public/..\\admin",
    "/admin%00",
    "/admin%00/x",
    "/../admin",
    "/%2e%2e/admin",
    "/public/../../admin",
    "/admin%",
    "/admin%zz",
    # Encoded delimiters an upstream may decode after the match (test_encoded_delimiters).
    "/public%2f..%2fadmin",
    "/public/..%2fadmin",
    "/public/%2e%2e%2fadmin",
    "/public/%5c../admin",
    "/admin#frag",
    "http://evil.example/admin",
    "http://evil.example/public/../admin",
    "HTTP://gw/admin",
    "admin",
    "*",
]


def target_request(target: str, *headers: tuple[str, str]) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: gw", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@pytest.fixture
async def pgw(make_gateway: GatewayFactory) -> Harness:
    h = await make_gateway(access_log=RecordingLog())
    add_keys(h.tower)
    return h


def routes_of(h: Harness) -> list[str]:
    log = h.gateway.access_log
    assert isinstance(log, RecordingLog)
    return [line["route"] for line in log.lines]


@pytest.mark.parametrize("target", sorted(ROUTED))
async def test_policy_and_upstream_path_are_the_same_path(pgw: Harness, target: str) -> None:
    route, upstream_path = ROUTED[target]
    assert pgw.client.port is not None
    # With a key that may do anything: the request goes through, and both ends
    # of the pair are visible.
    answer = await exchange(pgw.client.port, target_request(target, ("X-API-Key", ADMIN)))
    assert answer.status == 200, answer.raw
    assert routes_of(pgw) == [route]
    assert [seen.path for seen in pgw.upstream.seen] == [upstream_path]
    # Without a key, the same route's policy answers: only /public lets it through.
    answer = await exchange(pgw.client.port, target_request(target))
    assert answer.status == (200 if route == "public" else 401), answer.raw
    assert routes_of(pgw) == [route, route]
    assert len(pgw.upstream.seen) == (2 if route == "public" else 1)
    if route == "public":
        assert pgw.upstream.seen[-1].path == upstream_path


@pytest.mark.parametrize("target", REFUSED)
async def test_ambiguous_paths_are_refused_before_any_policy(pgw: Harness, target: str) -> None:
    assert pgw.client.port is not None
    answer = await exchange(pgw.client.port, target_request(target, ("X-API-Key", ADMIN)))
    assert answer.status == 400, answer.raw
    assert answer.first.json()["error"] in {"bad_path", "malformed_request"}
    assert answer.first.header("X-Request-Id")
    assert pgw.upstream.seen == []
    assert pgw.tower.calls == []
