"""W3C trace context: continued from the client to the tower and the upstream, in the logs.

The fake tower and upstreams record the headers they receive; the access and audit lines
are captured in memory.
"""

from __future__ import annotations

import json
import re

import pytest
from multidict import CIMultiDict

from gateway.tracing import continue_trace, parse_traceparent, parse_tracestate
from tests.conftest import GatewayFactory, Harness
from tests.test_audit import audit_events, captured, lines

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
PARENT = f"00-{TRACE}-{CLIENT_SPAN}-01"
STATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def parts(value: str | None) -> tuple[str, str, str]:
    assert value is not None
    match = TRACEPARENT_RE.fullmatch(value)
    assert match is not None, value
    trace, span, flags = match.groups()
    return trace, span, flags


async def known(make_gateway: GatewayFactory) -> Harness:
    h = await make_gateway(log={"access": True})
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    return h


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "value",
    [
        PARENT,
        f"00-{TRACE}-{CLIENT_SPAN}-00",
        f"01-{TRACE}-{CLIENT_SPAN}-01",
        f"01-{TRACE}-{CLIENT_SPAN}-01-what-a-later-version-adds",
    ],
)
def test_valid_traceparents_are_read(value: str) -> None:
    assert parse_traceparent(value) == (TRACE, CLIENT_SPAN, value[53:55])


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        PARENT.upper(),  # hex is lowercase
        f"ff-{TRACE}-{CLIENT_SPAN}-01",  # version ff is invalid
        f"00-{'0' * 32}-{CLIENT_SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE}-{CLIENT_SPAN}-01-extra",  # version 00 has exactly four fields
        f"01-{TRACE}-{CLIENT_SPAN}-01x",
        f"00-{TRACE[:-1]}-{CLIENT_SPAN}-01",
        f"00-{TRACE}-{CLIENT_SPAN}-1",
        f"00_{TRACE}_{CLIENT_SPAN}_01",
        f"00-{TRACE}-{CLIENT_SPAN}-01\r\nX-Evil: 1",
    ],
)
def test_malformed_traceparents_are_refused(value: str) -> None:
    assert parse_traceparent(value) is None


def test_tracestate_is_kept_only_when_every_member_is_well_formed() -> None:
    assert parse_tracestate([STATE]) == STATE
    assert parse_tracestate(["rojo=1", " congo=2 "]) == "rojo=1,congo=2"
    assert parse_tracestate(["tenant@vendor=x"]) == "tenant@vendor=x"
    assert parse_tracestate(["Rojo=1"]) is None  # keys are lowercase
    assert parse_tracestate(["rojo=1,rojo=2"]) is None  # a key at most once
    assert parse_tracestate(["rojo=a=b,"]) is None
    assert parse_tracestate([",".join(f"k{i}=v" for i in range(33))]) is None
    assert parse_tracestate(["k=" + "v" * 600]) is None
    assert parse_tracestate([]) is None


def test_a_new_trace_when_the_client_sent_none_or_a_bad_one() -> None:
    fresh = continue_trace(CIMultiDict())
    assert fresh.parent_id is None and fresh.sampled and fresh.state is None
    assert parts(fresh.traceparent)[0] == fresh.trace_id
    twice = continue_trace(CIMultiDict([("traceparent", PARENT), ("traceparent", PARENT)]))
    assert twice.trace_id != TRACE  # two headers: which one? neither
    kept = continue_trace(CIMultiDict([("traceparent", PARENT), ("tracestate", STATE)]))
    assert (kept.trace_id, kept.parent_id, kept.state) == (TRACE, CLIENT_SPAN, STATE)
    assert kept.span_id != CLIENT_SPAN


# --------------------------------------------------------------------------- the gateway


async def test_a_client_trace_reaches_the_tower_and_the_upstream(
    make_gateway: GatewayFactory,
) -> None:
    h = await known(make_gateway)
    access, audit = captured(h)
    headers = {"X-API-Key": "good-key-1", "traceparent": PARENT, "tracestate": STATE}
    response = await h.client.get("/x", headers=headers)
    assert response.status == 200

    tower_trace, tower_parent, tower_flags = parts(h.tower.headers[0].get("traceparent"))
    seen = h.upstream.seen[0]
    up_trace, up_parent, up_flags = parts(seen.header("traceparent"))
    assert tower_trace == up_trace == TRACE
    # The gateway is a hop: both calls are children of its span, not of the client's.
    assert tower_parent == up_parent != CLIENT_SPAN
    assert tower_flags == up_flags == "01"
    assert h.tower.headers[0].get("tracestate") == seen.header("tracestate") == STATE
    assert len(seen.headers["traceparent"]) == 1

    access_text, audit_text = lines(h, access, audit)
    assert json.loads(access_text.splitlines()[0])["trace_id"] == TRACE
    assert json.loads(audit_text.splitlines()[0])["trace_id"] == TRACE


async def test_without_a_traceparent_the_gateway_starts_a_trace(
    make_gateway: GatewayFactory,
) -> None:
    h = await known(make_gateway)
    access, audit = captured(h)
    response = await h.client.get("/x", headers={"X-API-Key": "good-key-1"})
    assert response.status == 200
    tower_trace, _, _ = parts(h.tower.headers[0].get("traceparent"))
    up_trace, _, flags = parts(h.upstream.seen[0].header("traceparent"))
    assert tower_trace == up_trace and flags == "01"
    assert h.upstream.seen[0].header("tracestate") is None
    access_text, audit_text = lines(h, access, audit)
    assert json.loads(access_text.splitlines()[0])["trace_id"] == up_trace
    assert json.loads(audit_text.splitlines()[0])["trace_id"] == up_trace
    second = await h.client.get("/x", headers={"X-API-Key": "good-key-1"})
    assert second.status == 200
    assert parts(h.upstream.seen[1].header("traceparent"))[0] != up_trace  # one per request


@pytest.mark.parametrize(
    "bad",
    [
        PARENT.upper(),
        f"00-{'0' * 32}-{CLIENT_SPAN}-01",
        f"00-{TRACE}-{CLIENT_SPAN}-01-extra",
        "00-not-a-trace",
    ],
)
async def test_a_malformed_traceparent_is_replaced_never_forwarded(
    make_gateway: GatewayFactory, bad: str
) -> None:
    h = await known(make_gateway)
    headers = {"X-API-Key": "good-key-1", "traceparent": bad, "tracestate": STATE}
    assert (await h.client.get("/x", headers=headers)).status == 200
    seen = h.upstream.seen[0]
    assert seen.headers["traceparent"] != [bad] and len(seen.headers["traceparent"]) == 1
    trace, _, _ = parts(seen.header("traceparent"))
    assert trace != TRACE and trace != "0" * 32
    assert seen.header("tracestate") is None  # it belonged to the refused trace
    assert parts(h.tower.headers[0].get("traceparent"))[0] == trace
    assert "tracestate" not in h.tower.headers[0]


async def test_refusals_carry_the_trace_id_in_the_audit_line(make_gateway: GatewayFactory) -> None:
    h = await known(make_gateway)
    headers = {"X-API-Key": "wrong-key", "traceparent": PARENT}
    assert (await h.client.get("/x", headers=headers)).status == 401
    events = [e for e in await audit_events(h) if e["event"] == "auth"]
    assert events[0]["trace_id"] == TRACE and events[0]["decision"] == "deny"
    assert parts(h.tower.headers[0].get("traceparent"))[0] == TRACE


async def test_a_public_route_forwards_the_trace_too(make_gateway: GatewayFactory) -> None:
    h = await known(make_gateway)
    assert (await h.client.get("/public/x", headers={"traceparent": PARENT})).status == 200
    trace, parent, _ = parts(h.upstream.seen[0].header("traceparent"))
    assert trace == TRACE and parent != CLIENT_SPAN
