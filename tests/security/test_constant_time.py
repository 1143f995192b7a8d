"""Item 12: secrets (the admin token, the tower's credentials, webhook signatures) are
compared in constant time. Checked by inspection (`hmac.compare_digest` is what decides,
and no `==` touches a secret) and by behaviour (every near miss is a 401, never a 500);
a statistical timing test would only be flaky."""

from __future__ import annotations

import ast
import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import gateway
from gateway.tower.server import create_tower_app
from gateway.tower.store import KeyStore
from tests.conftest import ADMIN_TOKEN, Harness
from tests.security.conftest import exchange

SOURCE = Path(gateway.__file__).parent
SECRET_NAMES = ("token", "secret", "signature", "password", "api_key", "mac", "expected_auth")
# `==` on these names compares no secret: identifiers, kinds, or the shape of a value.
NOT_SECRETS = {"kind", "token_type", "tokens", "typ", "secret_kind"}


def secretish(node: ast.AST) -> str | None:
    name = None
    if isinstance(node, ast.Name):
        name = node.id
    elif isinstance(node, ast.Attribute):
        name = node.attr
    elif isinstance(node, ast.Call):
        return secretish(node.func.value) if isinstance(node.func, ast.Attribute) else None
    if name is None or name.lower() in NOT_SECRETS:
        return None
    return name if any(part in name.lower() for part in SECRET_NAMES) else None


def test_no_secret_is_compared_with_eq() -> None:
    offenders = []
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                continue
            for operand in (node.left, *node.comparators):
                if isinstance(operand, ast.Constant):
                    continue
                name = secretish(operand)
                if name:
                    offenders.append(f"{path.relative_to(SOURCE)}:{node.lineno} {name}")
    assert offenders == []


@pytest.mark.parametrize(
    ("module", "function"),
    [
        ("ops/listener.py", "admin_guard"),
        ("tower/server.py", "_same"),
        ("replicas/webhook.py", "verify_webhook"),
        ("replicas/cache.py", None),
        ("replicas/bus.py", None),
    ],
)
def test_the_deciding_comparisons_are_compare_digest(module: str, function: str | None) -> None:
    tree = ast.parse((SOURCE / module).read_text())
    scope: ast.AST = tree
    if function is not None:
        (scope,) = [
            n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function
        ]
    calls = [
        n
        for n in ast.walk(scope)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "compare_digest"
    ]
    assert calls, f"{module}:{function} compares without hmac.compare_digest"


class Spy:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []
        self.real = hmac.compare_digest

    def __call__(self, a: Any, b: Any) -> bool:
        self.calls.append((a, b))
        return self.real(a, b)


WRONG = [
    "",
    "x",
    ADMIN_TOKEN[:-1],
    ADMIN_TOKEN + "x",
    ADMIN_TOKEN[:-1] + "X",
    ADMIN_TOKEN.upper(),
    " " + ADMIN_TOKEN + "x",
    "é" * len(ADMIN_TOKEN),
]


@pytest.mark.parametrize("token", WRONG)
async def test_every_near_miss_of_the_admin_token_is_401(
    gw: Harness, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    spy = Spy()
    monkeypatch.setattr(hmac, "compare_digest", spy)
    response = await gw.ops.get(
        "/admin/cache", headers={"Authorization": f"Bearer {token}".encode().decode("latin-1")}
    )
    assert response.status == 401
    assert spy.calls, "the token was not compared with compare_digest"
    response = await gw.ops.get("/admin/cache", headers=gw.admin_headers())
    assert response.status == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"Bearer \xff\xfe" + ADMIN_TOKEN.encode(),
        b"Bearer " + ADMIN_TOKEN.encode() + b"\x80",
        b"\xffearer x",
    ],
)
async def test_bytes_that_are_not_utf8_are_a_401_not_a_crash(gw: Harness, raw: bytes) -> None:
    assert gw.ops.port is not None
    request = (
        b"GET /admin/cache HTTP/1.1\r\nHost: ops\r\nConnection: close\r\nAuthorization: " + raw
    )
    answer = await exchange(gw.ops.port, request + b"\r\n\r\n")
    assert answer.status == 401, answer.raw


@pytest.fixture
async def tower_client(
    tmp_path: Path,
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> TestClient[web.Request, web.Application]:
    store = KeyStore(tmp_path / "keys.db", hash_secret=b"h" * 32)
    app = create_tower_app(store, api_key="served-tower-api-key", secret="served-tower-secret-0123")
    return await aiohttp_client(app)


@pytest.mark.parametrize(
    ("authorization", "secret"),
    [
        (b"Bearer served-tower-api-key", b"served-tower-secret-012"),
        (b"Bearer served-tower-api-key", b"served-tower-secret-01234"),
        (b"Bearer served-tower-api-ke", b"served-tower-secret-0123"),
        (b"bearer served-tower-api-key", b"served-tower-secret-0123"),
        (b"Bearer served-tower-api-key", b"served-tower-secret-012\xff"),
        (b"Bearer served-tower-api-key\xc3", b"served-tower-secret-0123"),
    ],
)
async def test_the_served_tower_refuses_every_near_miss_with_401(
    tower_client: TestClient[web.Request, web.Application], authorization: bytes, secret: bytes
) -> None:
    assert tower_client.port is not None
    body = b'{"api_key": "tk_test_x"}'
    request = (
        b"POST /api/v1/validate HTTP/1.1\r\nHost: tower\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nAuthorization: "
        + authorization
        + b"\r\nX-Tower-Secret: "
        + secret
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    answer = await exchange(tower_client.port, request)
    assert answer.status == 401, answer.raw
