"""The processes the benchmark stands up around the proxy under test, on loopback only.

`upstream`: an asyncio protocol answering every request with one small fixed body, with
no HTTP framework at all, so the core it shares with wrk goes to the proxies under test
(about a third of the CPU per request of aiohttp's low-level server).
`tower`: a fake key service. Every key of the form `k-<digits>` is valid. It answers the
gateway's `POST /api/v1/validate` exactly as the contract specifies, and `/auth` for nginx
`auth_request` (key in `X-API-Key`, answer 204 or 401). `GET /count` reports how many
validations it has answered and how many distinct keys it has seen, so the benchmark can
tell tower calls per scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
from typing import Final, cast

import uvloop
from aiohttp import web

UPSTREAM_BODY: Final = b'{"ok":true,"service":"bench-upstream"}'
VALID_KEY: Final = re.compile(r"k-[0-9]{1,18}")


UPSTREAM_ANSWER: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(UPSTREAM_BODY), UPSTREAM_BODY)
)
UPSTREAM_CLOSE: Final = UPSTREAM_ANSWER.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
MAX_HEAD: Final = 64 * 1024
_CONTENT_LENGTH: Final = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,12})", re.IGNORECASE)
_CLOSE: Final = re.compile(rb"\r\nconnection:[^\r]*close", re.IGNORECASE)
_CHUNKED: Final = re.compile(rb"\r\ntransfer-encoding:", re.IGNORECASE)


class Upstream(asyncio.Protocol):
    """HTTP/1.1 keep-alive, pipelining, and bodies with a Content-Length (read and dropped);
    a chunked body is not supported and closes the connection."""

    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        transport = self._transport
        assert transport is not None
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    transport.close()
                    return
                break
            head = buffer[:end]
            length = _CONTENT_LENGTH.search(head)
            size = end + 4 + (int(length.group(1)) if length else 0)
            if _CHUNKED.search(head):
                transport.close()
                return
            if len(buffer) < size:
                break
            buffer = buffer[size:]
            if _CLOSE.search(head):
                transport.write(UPSTREAM_CLOSE)
                transport.close()
                return
            transport.write(UPSTREAM_ANSWER)
        self._buffer = buffer


class Tower:
    """Counts what it answers; every `k-<digits>` key belongs to an operator."""

    def __init__(self, api_key: str, secret: str) -> None:
        self._authorization = f"Bearer {api_key}"
        self._secret = secret
        self.validate_calls = 0
        self.auth_calls = 0
        self.distinct: set[str] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/validate", self.validate)
        app.router.add_route("*", "/auth", self.auth)
        app.router.add_get("/count", self.count)
        app.router.add_get("/", self.root)
        return app

    def _credentials_ok(self, request: web.BaseRequest) -> bool:
        return (
            request.headers.get("Authorization") == self._authorization
            and request.headers.get("X-Tower-Secret") == self._secret
        )

    @staticmethod
    def _record(key: str) -> dict[str, object]:
        n = key[2:]
        return {
            "valid": True,
            "key_id": f"kid-{n}",
            "user_id": f"user-{n}",
            "role": "operator",
            "scopes": ["tools:execute"],
        }

    async def validate(self, request: web.Request) -> web.Response:
        if not self._credentials_ok(request):
            return web.json_response({"error": "bad tower credentials"}, status=401)
        body = await request.json()
        key = body.get("api_key") if isinstance(body, dict) else None
        self.validate_calls += 1
        if not isinstance(key, str) or not VALID_KEY.fullmatch(key):
            return web.json_response({"valid": False, "reason": "invalid"}, status=401)
        self.distinct.add(key)
        return web.json_response(self._record(key))

    async def auth(self, request: web.Request) -> web.Response:
        """The shape `auth_request` wants: 2xx lets the request through, 401 refuses it."""
        if not self._credentials_ok(request):
            return web.Response(status=500, text="bad tower credentials")
        key = request.headers.get("X-API-Key", "")
        self.auth_calls += 1
        if not VALID_KEY.fullmatch(key):
            return web.Response(status=401)
        self.distinct.add(key)
        record = self._record(key)
        return web.Response(
            status=204,
            headers={
                "X-User-Id": str(record["user_id"]),
                "X-Key-Id": str(record["key_id"]),
                "X-Role": str(record["role"]),
            },
        )

    async def count(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "calls": self.validate_calls + self.auth_calls,
                "validate": self.validate_calls,
                "auth": self.auth_calls,
                "distinct": len(self.distinct),
            }
        )

    async def root(self, _request: web.Request) -> web.Response:
        return web.json_response({"service": "bench-tower"})


async def _serve(role: str, port: int) -> None:
    runner: web.BaseRunner
    loop = asyncio.get_running_loop()
    runner: web.BaseRunner | None = None
    server: asyncio.Server | None = None
    if role == "upstream":
        server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=2048)
    else:
        tower = Tower(os.environ["TOWER_API_KEY"], os.environ["TOWER_SECRET"])
        runner = web.AppRunner(tower.app(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
    print(json.dumps({"ready": port}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if server is not None:
        server.close()
    if runner is not None:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("upstream", "tower"))
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(args.role, args.port))


if __name__ == "__main__":
    main()
