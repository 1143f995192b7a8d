"""Class 8: pipelined HTTP/1.1 requests sent in one write are all answered, in order,
with both of aiohttp's parsers; a request that closes the connection is answered, and
nothing after it is read."""

from __future__ import annotations

import pytest

from tests.security.conftest import GOOD, GatewayProcess, exchange, request_bytes


def paths(answer_bodies: list[bytes]) -> list[str]:
    import json

    return [json.loads(body)["path"] for body in answer_bodies]


PIPELINES = {
    "keepalive_then_close": (
        [request_bytes("/public/a", close=False), request_bytes("/public/b")],
        ["/public/a", "/public/b"],
    ),
    "three_last_closes": (
        [
            request_bytes("/public/a", close=False),
            request_bytes("/x", ("X-API-Key", GOOD), close=False),
            request_bytes("/public/c"),
        ],
        ["/public/a", "/x", "/public/c"],
    ),
    "close_in_the_middle": (
        [
            request_bytes("/public/a", close=False),
            request_bytes("/public/b"),
            request_bytes("/public/never"),
        ],
        ["/public/a", "/public/b"],
    ),
    "http10_first": (
        [request_bytes("/public/a", close=False, version="HTTP/1.0"), request_bytes("/public/b")],
        ["/public/a"],
    ),
    "bodies": (
        [
            request_bytes("/public/a", method="POST", body=b"x" * 100, close=False),
            request_bytes("/public/b", method="POST", body=b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"),
            request_bytes("/public/never"),
        ],
        ["/public/a", "/public/b"],
    ),
    "many": (
        [request_bytes(f"/public/{i}", close=False) for i in range(40)]
        + [request_bytes("/public/last")],
        [f"/public/{i}" for i in range(40)] + ["/public/last"],
    ),
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
async def test_pipelined_requests_are_answered_in_order(gproc: GatewayProcess, name: str) -> None:
    parts, expected = PIPELINES[name]
    answer = await exchange(gproc.port, b"".join(parts))
    assert [r.status for r in answer.replies] == [200] * len(expected), answer.raw[:500]
    assert paths([r.body for r in answer.replies]) == expected
    assert [s.path for s in gproc.upstream.seen] == expected
    assert answer.closed


async def test_a_pipeline_split_anywhere_is_answered_the_same(gproc: GatewayProcess) -> None:
    whole = b"".join(
        [request_bytes("/public/a", close=False), request_bytes("/public/b", method="POST",
         body=b"hello", close=False), request_bytes("/public/c")]
    )
    for cut in (5, 40, len(whole) // 2, len(whole) - 3):
        gproc.upstream.seen.clear()
        answer = await exchange(gproc.port, whole[:cut], whole[cut:])
        assert [r.status for r in answer.replies] == [200, 200, 200], (cut, answer.raw[:300])
        assert [s.path for s in gproc.upstream.seen] == ["/public/a", "/public/b", "/public/c"]
