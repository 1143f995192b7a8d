"""The client for a remote tower: the exact request of the contract, a strict reading.

One pooled `aiohttp.ClientSession` per process, the HTTP stack the gateway
already serves and forwards with. (An `httpx.AsyncClient` was measured at about
1 ms of CPU per call here, most of it httpcore scanning its pool with a `poll()`
per connection and anyio task lookups; aiohttp costs a small fraction of that.)
Redirects are never followed (the tower secret never leaves the tower's origin),
the body read is bounded, and the whole exchange, including a slow-drip body,
has one total deadline.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

import aiohttp
from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector

from gateway.config import TowerConfig
from gateway.errors import TowerFault
from gateway.tower import TowerAnswer, parse_answer
from gateway.tracing import outgoing, span

MAX_BODY: Final = 64 * 1024
VALIDATE_PATH: Final = "/api/v1/validate"
TOWER_SECRET_HEADER: Final = "X-Tower-Secret"


class RemoteTower:
    """Validates keys with `POST {tower.url}/api/v1/validate`."""

    name = "remote"

    def __init__(self, config: TowerConfig) -> None:
        assert config.url is not None and config.api_key and config.secret
        self._url = config.url.rstrip("/") + VALIDATE_PATH
        self._root = config.url.rstrip("/") + "/"
        self._timeout = config.timeout
        self._connect_timeout = config.connect_timeout or config.timeout
        self._max_connections = config.max_connections
        self._headers = {
            "Authorization": f"Bearer {config.api_key}",
            TOWER_SECRET_HEADER: config.secret,
            "Content-Type": "application/json",
            "Accept": "application/json",
            # The body is read raw and bounded: a compressed answer would be
            # unreadable, and decompressing it would defeat the bound.
            "Accept-Encoding": "identity",
        }
        self._session: ClientSession | None = None

    def _client(self) -> ClientSession:
        # Created on first use: a session belongs to the running event loop.
        if self._session is None or self._session.closed:
            self._session = ClientSession(
                connector=TCPConnector(limit=self._max_connections, ttl_dns_cache=60),
                timeout=ClientTimeout(total=None, sock_connect=self._connect_timeout),
                auto_decompress=False,
                cookie_jar=DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    async def validate(self, api_key: str) -> TowerAnswer:
        try:
            with span("tower validate", client=True):
                async with asyncio.timeout(self._timeout):
                    status, body = await self._exchange(api_key)
        except TimeoutError:
            raise TowerFault("timeout", f"no complete answer within {self._timeout}s") from None
        except aiohttp.ClientConnectorError as exc:
            raise TowerFault("refused", f"cannot connect: {type(exc).__name__}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise TowerFault("error", f"transport error: {type(exc).__name__}") from None
        return self._interpret(status, body)

    async def _exchange(self, api_key: str) -> tuple[int, bytes]:
        payload = json.dumps({"api_key": api_key}).encode()
        async with self._client().post(
            self._url, data=payload, headers=outgoing(self._headers), allow_redirects=False
        ) as response:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if size > MAX_BODY:
                    raise TowerFault("malformed", f"answer larger than {MAX_BODY} bytes")
                chunks.append(chunk)
            return response.status, b"".join(chunks)

    @staticmethod
    def _interpret(status: int, raw: bytes) -> TowerAnswer:
        try:
            body = json.loads(raw, object_pairs_hook=_unique_members)
        except _RepeatedMember:
            # `{"valid": false, ..., "valid": true}` reads differently to different
            # parsers: no answer at all.
            raise TowerFault(
                "malformed", "the answer repeats a JSON member", key_specific=400 <= status < 500
            ) from None
        except (ValueError, RecursionError):  # RecursionError: `[[[[...` nested too deep
            body = None
        # A `valid: false` answer is believed whatever the status (the
        # contract's rule, and a refusal can only deny); a 401/403 without one
        # is about the gateway's own credentials, not the key.
        if isinstance(body, dict) and body.get("valid") is False:
            return parse_answer(status, body)
        if 300 <= status < 400:
            raise TowerFault("redirect", f"tower answered {status}; redirects are not followed")
        if status >= 500:
            raise TowerFault("server_error", f"tower answered {status}")
        # Any other 4xx may be about the key a client chose (one the tower cannot
        # parse, say): a fault for that key, never one that opens the circuit.
        client_error = 400 <= status < 500
        if status in (401, 403):
            raise TowerFault(
                "tower_auth",
                f"tower refused the gateway's credentials ({status})",
                key_specific=True,
            )
        if body is None:
            raise TowerFault(
                "malformed",
                f"status {status} with a body that is not JSON",
                key_specific=client_error,
            )
        if status != 200:
            raise TowerFault("malformed", f"unexpected status {status}", key_specific=client_error)
        return parse_answer(status, body)

    async def ping(self) -> bool:
        """Reachable means it answers HTTP at all; readiness, not validity."""
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._client().get(self._root, allow_redirects=False),
            ):
                pass
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False
        return True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _RepeatedMember(ValueError):
    """A JSON object names one member twice."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    body = dict(pairs)
    if len(body) != len(pairs):
        raise _RepeatedMember
    return body
