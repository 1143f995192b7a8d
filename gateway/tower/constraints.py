"""What a key's tower record restricts (CONTRACT section 11), read once per tower answer.

    metadata.allowed_ips       addresses and CIDR blocks (IPv4, IPv6)  -> 403 ip_not_allowed
    metadata.allowed_origins   origins (scheme://host[:port])          -> 403 origin_not_allowed
    metadata.quota             {"limit": N, "period": "day"|"month"}   -> 429 quota_exceeded
    metadata.rate_limit_scope  key | user | team: who shares the rate limit and the quota

`parse_constraints` runs with `parse_answer`, so a cached identity carries its constraints
already parsed and a request only looks them up. A member that is present but malformed never
makes the key unrestricted: the constraints come back `malformed` (with what is wrong, never a
value of the record), and `decide()` refuses every request of that key.

IP lists are kept as sorted integer ranges per address family, so a check is one
`ip_address()` and one `bisect`, however many blocks the list has.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from socket import AF_INET, AF_INET6, inet_pton
from typing import Any, Final

MAX_ALLOWED: Final = 1024
MAX_QUOTA: Final = 10**12
PERIODS: Final = ("day", "month")
SCOPES: Final = ("key", "user", "team")
MAX_ORIGIN_LENGTH: Final = 256
_V4_MAPPED: Final = 0xFFFF


@dataclass(frozen=True, slots=True)
class Quota:
    limit: int
    period: str  # day | month


@dataclass(frozen=True, slots=True)
class IpRanges:
    """Merged, sorted [start, end] integer ranges per address family (4 or 6)."""

    starts4: tuple[int, ...]
    ends4: tuple[int, ...]
    starts6: tuple[int, ...]
    ends6: tuple[int, ...]

    def allows(self, address: str | None) -> bool:
        if address is None:
            return False
        # inet_pton (C) rather than ipaddress.ip_address: a few times faster, and as strict.
        try:
            value = int.from_bytes(inet_pton(AF_INET, address), "big")
            starts, ends = self.starts4, self.ends4
        except OSError:
            try:
                value = int.from_bytes(inet_pton(AF_INET6, address.split("%", 1)[0]), "big")
            except (OSError, ValueError):
                return False
            if value >> 32 == _V4_MAPPED:  # ::ffff:a.b.c.d is the IPv4 client a.b.c.d
                value &= 0xFFFFFFFF
                starts, ends = self.starts4, self.ends4
            else:
                starts, ends = self.starts6, self.ends6
        i = bisect_right(starts, value) - 1
        return i >= 0 and value <= ends[i]


@dataclass(frozen=True, slots=True)
class Constraints:
    """A key's restrictions; `malformed` says why the key may not be used at all."""

    ips: IpRanges | None = None
    origins: frozenset[str] | None = None
    quota: Quota | None = None
    scope: str = "key"
    malformed: str | None = None
    # Whether `check` has anything to check: a field, not a property, since every request
    # reads it.
    restricted: bool = False


NO_CONSTRAINTS: Final = Constraints()
MEMBERS: Final = ("allowed_ips", "allowed_origins", "quota", "rate_limit_scope")


class _Malformed(ValueError):
    pass


def parse_constraints(metadata: Mapping[str, Any]) -> Constraints:
    """The constraints `metadata` sets; never raises (a bad member makes them `malformed`)."""
    if not any(member in metadata for member in MEMBERS):
        return NO_CONSTRAINTS
    try:
        ips = _ips(metadata.get("allowed_ips"))
        origins = _origins(metadata.get("allowed_origins"))
        return Constraints(
            ips=ips,
            origins=origins,
            quota=_quota(metadata.get("quota")),
            scope=_scope(metadata.get("rate_limit_scope")),
            restricted=ips is not None or origins is not None,
        )
    except _Malformed as exc:
        return Constraints(malformed=str(exc), restricted=True)


def _entries(raw: object, name: str) -> list[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_ALLOWED:
        raise _Malformed(f"{name} is not a list of at most {MAX_ALLOWED} strings")
    for i, entry in enumerate(raw):
        if not isinstance(entry, str) or not entry or len(entry) > MAX_ORIGIN_LENGTH:
            raise _Malformed(f"{name}[{i}] is not a non-empty string")
    return raw


def ip_network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address or CIDR block, strictly (host bits set are refused); raises ValueError."""
    text = entry.strip()
    if not text or text != entry or "%" in text:
        raise ValueError(f"{entry!r} is not an address or CIDR block")
    return ipaddress.ip_network(text, strict=True)


def _ips(raw: object) -> IpRanges | None:
    entries = _entries(raw, "allowed_ips")
    if entries is None:
        return None
    nets: dict[int, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {4: [], 6: []}
    for i, entry in enumerate(entries):
        try:
            net = ip_network(entry)
        except ValueError:
            raise _Malformed(f"allowed_ips[{i}] is not an address or CIDR block") from None
        nets[net.version].append(net)
    ranges: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for version, group in nets.items():
        collapsed = sorted(ipaddress.collapse_addresses(group))  # type: ignore[type-var]
        ranges[version] = (
            tuple(int(n.network_address) for n in collapsed),
            tuple(int(n.broadcast_address) for n in collapsed),
        )
    return IpRanges(ranges[4][0], ranges[4][1], ranges[6][0], ranges[6][1])


def normalise_origin(origin: str) -> str | None:
    """`scheme://host[:port]` in lower case without a trailing slash; None when not one."""
    text = origin.strip().lower().rstrip("/")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest or "@" in rest:
        return None
    if not rest.isprintable() or " " in rest:
        return None
    return text


def _origins(raw: object) -> frozenset[str] | None:
    entries = _entries(raw, "allowed_origins")
    if entries is None:
        return None
    out = set()
    for i, entry in enumerate(entries):
        origin = normalise_origin(entry)
        if origin is None:
            raise _Malformed(f"allowed_origins[{i}] is not an origin (scheme://host[:port])")
        out.add(origin)
    return frozenset(out)


def parse_quota_text(text: str) -> Quota:
    """`N/day` or `N/month`, as the embedded tower's CLI takes it; raises ValueError."""
    number, sep, period = text.strip().partition("/")
    if not sep or not number.isdigit() or period not in PERIODS:
        raise ValueError(f"quota {text!r} is not N/day or N/month")
    quota = _quota({"limit": int(number), "period": period})
    assert quota is not None
    return quota


def _quota(raw: object) -> Quota | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _Malformed("quota is not an object")
    limit, period = raw.get("limit"), raw.get("period")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_QUOTA:
        raise _Malformed(f"quota.limit is not a whole number from 1 to {MAX_QUOTA}")
    if period not in PERIODS:
        raise _Malformed("quota.period is not 'day' or 'month'")
    return Quota(limit, str(period))


def _scope(raw: object) -> str:
    if raw is None:
        return "key"
    if raw not in SCOPES:
        raise _Malformed("rate_limit_scope is not 'key', 'user' or 'team'")
    return str(raw)
