"""Class 1: encoded delimiters (`%2F`, `%5C`, `%3B`, any case, once or twice encoded,
next to dot segments) are refused with 400 `bad_path`, on HTTP, on WebSocket upgrades
and in `explain`, unless a route opts in to `%2F` alone."""

from __future__ import annotations

import pytest

from gateway.auth.routes import RouteTable, normalise_path
from gateway.config import parse_config
from gateway.errors import BadRequest
from tests.conftest import ENV, GatewayFactory, Harness
from tests.security.conftest import ADMIN, add_keys, exchange, request_bytes

REFUSED = [
    "/public/..%2Fadmin",
    "/public/..%2fadmin",
    "/public%2F..%2Fadmin",
    "/public/%2e%2e%2Fadmin",
    "/public/a%2Fb",
    "/public/..%5Cadmin",
    "/public/..%5cadmin",
    "/public/%5C",
    "/public/x%3Badmin",
    "/public/x%3bjsessionid=1",
    "/admin%3B/x",
    "/public/..%3B/admin",
    "/public/%252F..%252Fadmin",
    "/public/%255cadmin",
    "/public/%253Bx",
    "/public/%C0%AF../admin",
    "/public/%c0%afadmin",
    "/public/%C1%9Cadmin",
]


@pytest.mark.parametrize("target", REFUSED)
async def test_encoded_delimiters_are_bad_path(gw: Harness, target: str) -> None:
    assert gw.client.port is not None
    for headers in ((), (("X-API-Key", ADMIN),)):
        answer = await exchange(gw.client.port, request_bytes(target, *headers))
        assert answer.status == 400, (target, answer.raw)
        assert answer.first.json()["error"] == "bad_path"
    assert gw.upstream.seen == []
    assert gw.tower.calls == []


@pytest.mark.parametrize("target", ["/open/..%2Fx", "/x%3Badmin", "/x%5C..", "/x/%2f"])
async def test_websocket_upgrades_get_the_same_refusal(wsg: Harness, target: str) -> None:
    assert wsg.client.port is not None
    answer = await exchange(
        wsg.client.port,
        request_bytes(
            target,
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
            ("X-API-Key", ADMIN),
            close=False,
        ),
    )
    assert answer.status == 400 and answer.first.json()["error"] == "bad_path", answer.raw


async def test_explain_decides_the_same(gw: Harness) -> None:
    for target in ("/public/..%2Fadmin", "/public/x%3Badmin"):
        response = await gw.ops.post(
            "/admin/explain",
            json={"key": ADMIN, "method": "GET", "path": target},
            headers=gw.admin_headers(),
        )
        body = await response.json()
        assert (body["decision"], body["status"], body["reason"]) == ("deny", 400, "bad_path")


@pytest.fixture
async def slashy(make_gateway: GatewayFactory) -> Harness:
    upstream = "http://127.0.0.1:1"
    harness = await make_gateway(
        routes=[
            {"path": "/files", "upstream": upstream, "auth": False, "allow_encoded_slash": True},
            {"path": "/", "upstream": upstream, "auth": False},
        ]
    )
    # The harness's own upstream, so requests can reach it.
    for route in harness.gateway.components.routes.routes:
        object.__setattr__(route, "upstream_origin", harness.upstream.url)
    add_keys(harness.tower)
    return harness


async def test_a_route_may_allow_an_encoded_slash_kept_encoded(slashy: Harness) -> None:
    assert slashy.client.port is not None
    answer = await exchange(slashy.client.port, request_bytes("/files/a%2fb%2Fc"))
    assert answer.status == 200, answer.raw
    assert [seen.path for seen in slashy.upstream.seen] == ["/files/a%2Fb%2Fc"]
    # Still never next to a dot segment, never %5C or %3B, and only on that route.
    for target in ("/files/..%2Fx", "/files/a%2F..", "/files/a%2F.%2Fb", "/files/a%5Cb",
                   "/files/a%3Bb", "/other/a%2Fb", "/files%2F..%2Fx"):
        answer = await exchange(slashy.client.port, request_bytes(target))
        assert answer.status == 400, (target, answer.raw)
        assert answer.first.json()["error"] == "bad_path"
    assert len(slashy.upstream.seen) == 1


def test_normalise_refuses_delimiters_and_matching_never_decodes_a_slash() -> None:
    for raw in ("/a%5Cb", "/a%5cb", "/a%3Bb", "/a%3bb", "/a%252Fb", "/a%C0%AFb"):
        with pytest.raises(BadRequest):
            normalise_path(raw)
    config = parse_config(
        {
            "routes": [
                {"path": "/a/b", "upstream": "http://u:1", "allow_encoded_slash": True},
                {"path": "/a", "upstream": "http://u:2", "allow_encoded_slash": True},
            ]
        },
        env=ENV,
    )
    table = RouteTable(config.routes)
    # `/a%2Fb` is one segment of `/a`'s subtree, never the `/a/b` route.
    assert table.match(normalise_path("/a/x%2fb"), "GET").prefix == "/a"
    assert table.match(normalise_path("/a/b%2Fc"), "GET").prefix == "/a"
    assert table.match(normalise_path("/a/b/c%2Fd"), "GET").prefix == "/a/b"
