"""The first message of a WebSocket that authenticates in-band: `{"type": "auth", "api_key": K}`.

Parsed before anything is known about the client, so it is bounded and strict:
the key it yields has the shape a header key must have, and anything else is an
`Ending` that says why the connection closes.
"""

from __future__ import annotations

import json
from typing import Final

from aiohttp import WSCloseCode

from gateway.errors import WS_UNAUTHORIZED
from gateway.websocket.registry import Ending

# Before authentication a client gets only this much: an auth message is tiny,
# and an unauthenticated peer must not make the gateway parse big documents.
# Checked once the frame is read, so `max_message_size` bounds what reading it costs.
AUTH_MESSAGE_LIMIT: Final = 16 * 1024
BAD_AUTH_MESSAGE: Final = 4400


def auth_key(text: str, max_key_length: int) -> str | Ending:
    """The key of a first message, or why the message is not an auth message."""
    if len(text) > AUTH_MESSAGE_LIMIT:
        return Ending(
            WSCloseCode.POLICY_VIOLATION, "auth message too large", "auth_message_too_large"
        )
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: `[[[[...` nested too deep
        return Ending(BAD_AUTH_MESSAGE, "auth message is not JSON", "bad_auth_message")
    if not isinstance(body, dict) or body.get("type") != "auth":
        return Ending(
            BAD_AUTH_MESSAGE, 'expected {"type": "auth", "api_key": ...}', "bad_auth_message"
        )
    key = body.get("api_key")
    if not isinstance(key, str):
        return Ending(BAD_AUTH_MESSAGE, "api_key must be a string", "bad_auth_message")
    # The same shape rule as header keys: printable ASCII without space.
    if (
        not key
        or len(key) > max_key_length
        or not (key.isascii() and key.isprintable() and " " not in key)
    ):
        return Ending(WS_UNAUTHORIZED, "malformed API key", "malformed_key")
    return key
