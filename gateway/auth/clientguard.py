"""What the gateway checks about a client before it believes anything the client says.

Three guards, each cheap and each before any tower call:

- `check_request`: the method, the framing and the Host. TRACE, TRACK and
  CONNECT are refused (405) on every route, a method that is not an upper-case
  token of at most 32 characters is refused (400), and so is a request whose
  framing two HTTP implementations could read differently (HTTP/0.9,
  `Transfer-Encoding` in HTTP/1.0) or whose Host is missing, repeated or not
  `host[:port]`; all of them close the connection. An `Expect` other than
  `100-continue` gets 417. The gateway itself answers `100-continue`, and
  only once the request has passed authentication and policy
  (`gateway.proxy.forwarder`): a refused client never sends its body.
- `key_shape_ok`: with `credentials.key_format` set, a key that does not have
  the tower's prefix and checksum is refused without asking the tower.
- `FailureThrottle`: failed authentications per client address (GCRA, bounded
  memory); an address over `credentials.failed_auth_per_minute` gets 429
  `too_many_failures` until its bucket refills, whatever key it sends. IPv6
  clients are counted per /64, the block one subscriber usually holds.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Final

from aiohttp import HttpVersion10, HttpVersion11, hdrs, web

from gateway.auth.ratelimit import MemoryRateLimiter
from gateway.config import KeyFormatConfig
from gateway.errors import (
    BadRequest,
    ExpectationFailed,
    InvalidKey,
    MethodNotAllowed,
    RateLimited,
)
from gateway.tower.keyformat import looks_valid

# TRACE echoes the request (its cookies and keys) back; CONNECT would turn the
# gateway into a tunnel. TRACK is the same as TRACE on some servers.
REFUSED_METHODS: Final = frozenset({"TRACE", "TRACK", "CONNECT"})
ALLOW: Final = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
MAX_METHOD_LENGTH: Final = 32
# Methods are case-sensitive (RFC 9110 9.1): `get` is not GET, and an upstream
# that upper-cases it would apply GET's policy to a request routed as another.
_METHOD: Final = re.compile(rf"[A-Z][A-Z0-9_-]{{0,{MAX_METHOD_LENGTH - 1}}}")
# host[:port]: a DNS name or IPv4 address, or an IPv6 literal; empty is allowed (RFC 9112 3.2).
_HOST: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)?(?::[0-9]{1,5})?")
COMMON_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_TRACKED_ADDRESSES: Final = 100_000
IPV6_CLIENT_PREFIX: Final = 64


@functools.lru_cache(maxsize=256)
def _host_ok(host: str) -> bool:
    # Remembered: a gateway sees a handful of Host values, and this runs per request.
    return _HOST.fullmatch(host) is not None


def check_request(request: web.BaseRequest) -> None:
    """Refuses a method or framing the gateway does not forward; raises a `GatewayError`."""
    check_method(request.method)
    version = request.version
    if version not in (HttpVersion10, HttpVersion11):
        raise BadRequest("only HTTP/1.0 and HTTP/1.1 requests are accepted", close=True)
    hosts = request.headers.getall(hdrs.HOST, ())
    if (
        len(hosts) > 1
        or (hosts and not _host_ok(hosts[0]))
        or (not hosts and version == HttpVersion11)
    ):
        # RFC 9112 3.2. The Host becomes X-Forwarded-Host, which upstreams trust
        # for the links they build: a list or a stray character there is not
        # for them to untangle.
        raise BadRequest("the Host header is missing, repeated or not host[:port]", close=True)
    if version == HttpVersion10 and hdrs.TRANSFER_ENCODING in request.headers:
        # RFC 9112 6.1: an HTTP/1.0 intermediary may ignore Transfer-Encoding,
        # so such a body's length is in doubt: faulty framing.
        raise BadRequest("Transfer-Encoding in an HTTP/1.0 request", close=True)
    expect = request.headers.get(hdrs.EXPECT)
    if expect is not None and version == HttpVersion11 and expect.lower() != "100-continue":
        # RFC 9110 10.1.1; the detail does not quote the header (client input).
        raise ExpectationFailed("the only expectation supported is 100-continue", close=True)


def check_method(method: str) -> None:
    """Refuses TRACE, TRACK and CONNECT (405) and a method that is not a token (400); also
    what decision mode applies to the original request's method."""
    if method in REFUSED_METHODS:
        raise MethodNotAllowed(
            f"{method} is not supported by this gateway", headers={hdrs.ALLOW: ALLOW}, close=True
        )
    if method not in COMMON_METHODS and _METHOD.fullmatch(method) is None:
        # The detail does not quote the method: it is client input of any length.
        raise BadRequest(
            f"the method must be an upper-case token of at most {MAX_METHOD_LENGTH} characters",
            reason="bad_method",
            close=True,
        )


def key_shape_ok(key: str, key_format: KeyFormatConfig | None) -> bool:
    """Whether `key` could have been issued by the tower (always, with no format set)."""
    return key_format is None or looks_valid(key, key_format.prefix)


def client_bucket(address: str) -> str:
    """The throttle bucket of an address: itself for IPv4, its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{IPV6_CLIENT_PREFIX}", strict=False))
    return str(ip)


class FailureThrottle:
    """Counts failed authentications per client address and refuses addresses over the limit.

    Each address has a bucket of `per_minute` attempts that refills at `per_minute`
    a minute. An authentication spends one when it starts, so concurrent attempts
    cannot overdraw the bucket while the tower is being asked, and gets it back
    unless the key turns out invalid: only failures stay spent. While the bucket is
    empty every authentication from the address is refused, so a sprayer gets at
    most that many guesses a minute to the tower. Memory is bounded: at most
    `max_addresses` buckets, the least recently used dropped first. `per_minute` is
    passed on every call, so a config reload applies at once; 0 turns it off.
    """

    __slots__ = ("_limiter",)

    def __init__(
        self,
        *,
        max_addresses: int = MAX_TRACKED_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limiter = MemoryRateLimiter(max_buckets=max_addresses, clock=clock)

    def __len__(self) -> int:
        return len(self._limiter)

    @contextlib.contextmanager
    def attempt(self, client: str | None, per_minute: float) -> Iterator[None]:
        """One authentication from `client`, around the code that decides it.

        Raises `RateLimited` (`too_many_failures`) when the address has no attempt
        left; an `InvalidKey` from the block keeps the attempt spent.
        """
        if client is None or not per_minute > 0:
            yield
            return
        bucket = client_bucket(client)
        decision = self._limiter.decide(bucket, per_minute)
        if not decision.allowed:
            raise RateLimited(
                "Too many failed authentications from this address",
                reason="too_many_failures",
                headers={hdrs.RETRY_AFTER: str(max(1, math.ceil(decision.retry_after)))},
            )
        try:
            yield
        except InvalidKey:
            raise
        except BaseException:
            # Not the key's fault (the tower could not tell, the client left).
            self._limiter.refund(bucket, per_minute)
            raise
        self._limiter.refund(bucket, per_minute)
