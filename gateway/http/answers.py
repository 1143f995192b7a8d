"""The gateway's own answers: the one JSON error body, `{"error": <reason id>, "detail": ...}`,
and request ids.

Every listener (proxy, ops, admin, tower, supervisor) builds its errors here, so
a client parses one shape whatever refused it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from random import getrandbits
from typing import Any, Final

from aiohttp import web

from gateway.errors import GatewayError
from gateway.http.headers import NOSNIFF, REQUEST_ID

_REQUEST_ID_OK: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")


def request_id(value: str | None) -> str:
    """The client's `X-Request-Id` when it is a sane token, else a fresh one."""
    if value is not None and _REQUEST_ID_OK.fullmatch(value):
        return value
    # 128 random bits, like uuid4, without a system call per request: an id only
    # has to be unique, and `random` is reseeded from os.urandom in every process.
    return f"{getrandbits(128):032x}"


def json_response(
    data: Any, status: int = 200, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=json.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_body(reason: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"error": reason, "detail": detail, **extra}


def json_error(
    status: int,
    reason: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """An error answer in the gateway's one shape."""
    return json_response(error_body(reason, detail, **extra), status, headers=headers)


def error_response(exc: GatewayError, rid: str) -> web.Response:
    """The answer to a refused request: status, reason id, detail and the error's headers."""
    response = json_error(exc.status, exc.reason, exc.detail, headers=exc.headers)
    response.headers[REQUEST_ID] = rid
    response.headers[NOSNIFF[0]] = NOSNIFF[1]
    if exc.close:
        response.force_close()
    return response
