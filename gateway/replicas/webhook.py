"""`POST /admin/revocations` from the tower: a signed `{"key_ids": [...]}`, each key revoked
here and on every replica."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from aiohttp import web

from gateway.http.answers import json_error

WEBHOOK_MAX_AGE: Final = 300


WEBHOOK_MAX_KEY_IDS: Final = 1000


MAX_KEY_ID_LENGTH: Final = 256


SIGNATURE_HEADER: Final = "X-Signature"


TIMESTAMP_HEADER: Final = "X-Signature-Timestamp"


_TIMESTAMP: Final = re.compile(r"[0-9]{1,12}")


def parse_key_ids(message: dict[str, Any]) -> list[str]:
    """`{"key_ids": [...]}`: at most WEBHOOK_MAX_KEY_IDS printable strings of at most
    MAX_KEY_ID_LENGTH characters, duplicates dropped. Raises ValueError otherwise."""
    key_ids = message.get("key_ids")
    if not isinstance(key_ids, list) or len(key_ids) > WEBHOOK_MAX_KEY_IDS:
        raise ValueError(f"key_ids must be a list of at most {WEBHOOK_MAX_KEY_IDS} strings")
    for key_id in key_ids:
        if (
            not isinstance(key_id, str)
            or not 0 < len(key_id) <= MAX_KEY_ID_LENGTH
            or not key_id.isprintable()
        ):
            raise ValueError(f"each key_id must be 1-{MAX_KEY_ID_LENGTH} printable characters")
    return list(dict.fromkeys(key_ids))


def sign_webhook(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Signature` value for a body sent at `timestamp` (epoch seconds)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_webhook(
    secret: str, timestamp: str | None, signature: str | None, body: bytes, now: float
) -> bool:
    if timestamp is None or signature is None or not _TIMESTAMP.fullmatch(timestamp):
        return False
    # The timestamp is signed, so an old request cannot be made young: replays are bounded
    # to this window (and a revocation repeated is harmless).
    if abs(now - int(timestamp)) > WEBHOOK_MAX_AGE:
        return False
    expected = sign_webhook(secret, timestamp, body).encode()
    # compare_digest: the time taken must not reveal how much of the signature matched.
    return hmac.compare_digest(expected, signature.strip().encode("utf-8", "replace"))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def revocation_webhook(
    secret: str | None,
    revoke: Callable[[Sequence[str]], Awaitable[int]],
    *,
    clock: Callable[[], float] = time.time,
) -> Handler:
    """`POST /admin/revocations` from the tower: a signed `{"key_ids": [...]}`, each revoked
    here and on every replica. The admin bearer is checked by the caller; 404 without a
    configured secret, 401 on a bad or stale signature, 400 on a malformed body."""

    def error(status: int, code: str, detail: str) -> web.Response:
        return json_error(status, code, detail)

    async def handler(request: web.Request) -> web.StreamResponse:
        if secret is None:
            return error(404, "not_found", "revocation webhook disabled: no webhook secret")
        body = await request.read()
        headers = request.headers
        if not verify_webhook(
            secret, headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER), body, clock()
        ):
            return error(401, "bad_signature", "missing, wrong or expired webhook signature")
        try:
            message = json.loads(body)
        except (ValueError, RecursionError):
            return error(400, "bad_request", "the body is not JSON")
        try:
            if not isinstance(message, dict):
                raise ValueError("the body must be a JSON object")
            key_ids = parse_key_ids(message)
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        dropped = await revoke(key_ids)
        return web.json_response({"revoked": len(key_ids), "dropped_entries": dropped})

    return handler
