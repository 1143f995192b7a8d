"""`POST /admin/explain` and `tower-gateway explain`: the decision and its reasons, for a key
or a cached fingerprint, without forwarding, minting, spending a rate limit or logging the key."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main as cli
from tests.conftest import ADMIN_TOKEN, ENV, GatewayFactory, Harness
from tests.test_ops import sample

GOOD = {"X-API-Key": "good-key-1"}


async def explain(h: Harness, body: Any, *, status: int = 200) -> dict[str, Any]:
    response = await h.ops.post("/admin/explain", json=body, headers=h.admin_headers())
    assert response.status == status, await response.text()
    answer: dict[str, Any] = await response.json()
    return answer


async def test_explain_by_key_allow_and_deny(gw: Harness) -> None:
    allowed = await explain(gw, {"key": "good-key-1", "method": "post", "path": "/tools/run?x=1"})
    assert (allowed["decision"], allowed["status"], allowed["reason"]) == ("allow", 200, "allowed")
    assert allowed["method"] == "POST" and allowed["forwarded"] is True
    assert allowed["route"]["name"] == "tools" and allowed["route"]["require"] == [
        "execute:read_file"
    ]
    identity = allowed["identity"]
    assert (identity["user_id"], identity["key_id"], identity["role"]) == ("u1", "k1", "operator")
    assert identity["scopes"] == ["tools:execute"] and identity["team"] == "blue"
    assert identity["key"] == allowed["key"] and len(allowed["key"]) == 16
    assert allowed["role"] == "operator"
    assert allowed["capabilities"] == ["execute:*", "tools:execute"]
    assert allowed["missing_capability"] is None
    assert allowed["source"] == "tower" and allowed["rate_limit_per_minute"] == 100

    denied = await explain(gw, {"key": "good-key-1", "path": "/admin/users"})
    assert (denied["decision"], denied["status"], denied["reason"]) == (
        "deny",
        403,
        "missing_capability",
    )
    assert denied["missing_capability"] == "admin:write" and denied["forwarded"] is False
    assert denied["detail"] == "Missing required capability: admin:write"
    assert denied["source"] == "hit"  # the first explain cached it, as a request would

    invalid = await explain(gw, {"key": "who-is-this", "path": "/x"})
    assert (invalid["decision"], invalid["status"], invalid["reason"]) == (
        "deny",
        401,
        "invalid_key",
    )
    assert invalid["identity"] is None and len(invalid["key"]) == 16

    malformed = await explain(gw, {"key": "two words", "path": "/x"})
    assert (malformed["status"], malformed["reason"]) == (400, "malformed_key")
    bad_path = await explain(gw, {"key": "good-key-1", "path": "/../etc"})
    assert (bad_path["status"], bad_path["reason"], bad_path["route"]) == (400, "bad_path", None)
    public = await explain(gw, {"key": "good-key-1", "path": "/public/p"})
    assert (public["decision"], public["reason"], public["identity"]) == (
        "allow",
        "public_route",
        None,
    )
    gw.tower.mode = "error500"
    down = await explain(gw, {"key": "unseen-key", "path": "/x"})
    assert (down["decision"], down["status"], down["reason"]) == ("deny", 503, "tower_unavailable")


async def test_explain_no_route(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(routes=[{"path": "/api", "upstream": "http://127.0.0.1:9"}])
    answer = await explain(h, {"key": "any-key", "path": "/elsewhere"})
    assert (answer["status"], answer["reason"], answer["decision"]) == (404, "no_route", "deny")
    assert h.tower.calls == []  # no route: the key is never looked up


async def test_explain_by_fingerprint_from_the_log(gw: Harness) -> None:
    assert (await gw.client.get("/x", headers=GOOD)).status == 200
    response = await gw.ops.get("/admin/audit?limit=1", headers=gw.admin_headers())
    fingerprint = (await response.json())["events"][0]["key"]
    answer = await explain(gw, {"fingerprint": fingerprint, "path": "/admin/x"})
    assert (answer["decision"], answer["missing_capability"]) == ("deny", "admin:write")
    assert answer["identity"]["key_id"] == "k1" and answer["source"] == "cache"
    assert answer["key"] == fingerprint
    assert gw.tower.calls == ["good-key-1"]  # no tower call: the cache answered

    unknown = await explain(gw, {"fingerprint": "0" * 16, "path": "/x"}, status=404)
    assert unknown["error"] == "unknown_fingerprint"
    # Dropped from the cache: no longer explainable by fingerprint.
    await gw.ops.delete("/admin/cache/k1", headers=gw.admin_headers())
    await explain(gw, {"fingerprint": fingerprint, "path": "/x"}, status=404)


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        [],
        {"path": "/x"},
        {"key": "k", "fingerprint": "0" * 16, "path": "/x"},
        {"key": "", "path": "/x"},
        {"key": 7, "path": "/x"},
        {"fingerprint": "XYZ", "path": "/x"},
        {"key": "k", "path": ""},
        {"key": "k", "path": "/x", "method": "GET /"},
        {"key": "k", "path": "/x", "extra": 1},
    ],
)
async def test_explain_refuses_bad_bodies(gw: Harness, body: Any) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    response = await gw.ops.post("/admin/explain", data=data, headers=gw.admin_headers())
    assert response.status == 400
    answer = await response.json()
    assert answer["error"] == "bad_request" and answer["detail"]
    assert gw.tower.calls == []


async def test_explain_needs_the_admin_token(gw: Harness) -> None:
    response = await gw.ops.post("/admin/explain", json={"key": "good-key-1", "path": "/x"})
    assert response.status == 401
    assert gw.tower.calls == []


async def test_explain_spends_no_rate_limit_mints_nothing_and_logs_no_key(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    h = await make_gateway()
    h.tower.add("limited-key", key_id="k3", user_id="u3", role="operator", rate_limit=2)
    for _ in range(5):
        answer = await explain(h, {"key": "limited-key", "path": "/x"})
        assert answer["decision"] == "allow" and answer["rate_limit_per_minute"] == 2
    h.tower.mode = "garbage"
    await explain(h, {"key": "faulty-key", "path": "/x"})
    h.tower.mode = "ok"
    text = await h.metrics()
    assert sample(text, "tower_gateway_jwt_tokens_total", origin="minted") == 0
    assert sample(text, "tower_gateway_requests_total", route="root", status="200") is None
    for status in (200, 200, 429):
        assert (await h.client.get("/x", headers={"X-API-Key": "limited-key"})).status == status

    response = await h.ops.get("/admin/audit", headers=h.admin_headers())
    audit = await response.text()
    logged = "\n".join(r.getMessage() + repr(r.args) for r in caplog.records)
    explains = [e for e in json.loads(audit)["events"] if e.get("action") == "explain"]
    assert len(explains) == 6 and explains[-1]["decision"] == "allow"
    for key in ("limited-key", "faulty-key"):
        assert key not in audit and key not in logged


async def test_explain_on_a_shadow_route_says_would_deny(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(
        routes=[
            {
                "path": "/",
                "upstream": "http://127.0.0.1:9",
                "require": ["admin:write"],
                "enforce": False,
            }
        ]
    )
    h.tower.add("good-key-1", key_id="k1", user_id="u1", role="operator")
    answer = await explain(h, {"key": "good-key-1", "path": "/x"})
    assert (answer["decision"], answer["status"], answer["forwarded"]) == ("would_deny", 403, True)
    answer = await explain(h, {"key": "nobody", "path": "/x"})
    assert (answer["decision"], answer["reason"]) == ("would_deny", "invalid_key")
    h.tower.mode = "error500"
    answer = await explain(h, {"key": "unseen", "path": "/x"})
    assert (answer["decision"], answer["forwarded"]) == ("deny", False)  # never shadowed


# --------------------------------------------------------------------------- the command


async def run_cli(argv: list[str]) -> int:
    # In a thread: the command blocks on HTTP while this loop serves the ops app.
    code: int = await asyncio.to_thread(cli.main, ["explain", *argv])
    return code


async def test_explain_command_reports_and_exits_by_decision(
    gw: Harness, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN", raising=False)
    ops = str(gw.ops.make_url("")).rstrip("/")
    common = ["--ops", ops, "--admin-token", ADMIN_TOKEN]

    assert await run_cli([*common, "--key", "good-key-1", "--path", "/tools/run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ALLOW  GET /tools/run  -> 200 allowed")
    assert "user u1, key_id k1, tower role operator -> role operator" in out
    assert "good-key-1" not in out

    assert await run_cli([*common, "--key", "good-key-1", "--path", "/admin/x"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DENY  GET /admin/x  -> 403 missing_capability")
    assert "missing      admin:write" in out

    monkeypatch.setattr(sys, "stdin", io.StringIO("good-key-1\n"))
    assert await run_cli([*common, "--key", "-", "--path", "/x", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["decision"] == "allow"

    fingerprint = answer["key"]
    assert await run_cli([*common, "--fingerprint", fingerprint, "--path", "/admin/x"]) == 1
    capsys.readouterr()

    wrong = ["--ops", ops, "--admin-token", "wrong-token-wrong-token"]
    assert await run_cli([*wrong, "--key", "good-key-1", "--path", "/x"]) == 2
    assert "401" in capsys.readouterr().err
    closed = ["--ops", "http://127.0.0.1:9", "--admin-token", ADMIN_TOKEN]
    assert await run_cli([*closed, "--key", "good-key-1", "--path", "/x"]) == 2
    assert "cannot reach" in capsys.readouterr().err


async def test_explain_command_reads_ops_and_token_from_the_config(
    gw: Harness,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert gw.ops.port is not None
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tower": {"url": gw.tower.url},
                "ops": {"host": "0.0.0.0", "port": gw.ops.port},
                "routes": [{"path": "/", "upstream": gw.upstream.url}],
            }
        )
    )
    argv = ["--config", str(config), "--key", "good-key-1", "--path", "/x"]
    assert await run_cli(argv) == 0
    assert capsys.readouterr().out.startswith("ALLOW")
    monkeypatch.delenv("GATEWAY_JWT_SECRET")
    assert await run_cli(argv) == 2  # the config cannot be read: named, not guessed
    assert "jwt.secret" in capsys.readouterr().err
