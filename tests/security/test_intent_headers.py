"""Class 3: headers asking an upstream to treat a request as another method or URL are
removed, in any case and `_`/`.` spelling, unless the route lists them in
`forward_headers`."""

from __future__ import annotations

import pytest

from gateway.config import INTENT_HEADERS, parse_config
from gateway.errors import ConfigError
from tests.conftest import ENV, GatewayFactory, Harness
from tests.security.conftest import add_keys, exchange, request_bytes

SPELLINGS = [
    ("X-HTTP-Method-Override", "DELETE"),
    ("x-http-method-override", "DELETE"),
    ("X_HTTP_Method_Override", "DELETE"),
    ("X.HTTP.Method.Override", "DELETE"),
    ("X-HTTP-Method", "PUT"),
    ("X-Method-Override", "PATCH"),
    ("X-Original-URL", "/admin"),
    ("X-ORIGINAL-URL", "/admin"),
    ("X-Rewrite-URL", "/admin"),
    ("X_Rewrite_Url", "/admin"),
    ("X-Override-URL", "/admin"),
]


@pytest.mark.parametrize(("name", "value"), SPELLINGS)
async def test_intent_headers_never_reach_the_upstream(gw: Harness, name: str, value: str) -> None:
    assert gw.client.port is not None
    answer = await exchange(gw.client.port, request_bytes("/public/x", (name, value)))
    assert answer.status == 200, answer.raw
    (seen,) = gw.upstream.seen
    assert seen.method == "GET"
    assert not set(seen.headers) & INTENT_HEADERS
    assert all(n.replace("_", "-").replace(".", "-") not in INTENT_HEADERS for n in seen.headers)


async def test_a_route_may_forward_the_ones_it_lists(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(
        routes=[
            {
                "path": "/legacy",
                "upstream": "http://127.0.0.1:1",
                "auth": False,
                "forward_headers": ["X-HTTP-Method-Override"],
            },
            {"path": "/", "upstream": "http://127.0.0.1:1", "auth": False},
        ]
    )
    for route in h.gateway.components.routes.routes:
        object.__setattr__(route, "upstream_origin", h.upstream.url)
    add_keys(h.tower)
    assert h.client.port is not None
    headers = (("x-http-method-override", "DELETE"), ("X-Original-URL", "/admin"))
    await exchange(h.client.port, request_bytes("/legacy/x", *headers))
    await exchange(h.client.port, request_bytes("/other", *headers))
    legacy, other = h.upstream.seen
    assert legacy.header("x-http-method-override") == "DELETE"
    assert legacy.header("x-original-url") is None
    assert other.header("x-http-method-override") is None


def test_forward_headers_takes_only_intent_headers() -> None:
    for name in ("X-API-Key", "Authorization", "X-Forwarded-For", "Host"):
        with pytest.raises(ConfigError, match="forward_headers"):
            parse_config(
                {"routes": [{"path": "/", "upstream": "http://u:1", "forward_headers": [name]}]},
                env=ENV,
            )
