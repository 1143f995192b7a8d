"""The restriction flags of `keys create` (CONTRACT section 11) and how keys show them.

    --allow-ip CIDR...      metadata.allowed_ips
    --allow-origin O...     metadata.allowed_origins
    --quota N/day|N/month   metadata.quota
    --limit-scope S         metadata.rate_limit_scope (key, user or team)

Each value is checked here, with an error naming the flag; the store checks the whole record
again with the gateway's own reading (`parse_constraints`), so nothing it stores is refused
later.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, Final

from gateway.tower.constraints import SCOPES, ip_network, normalise_origin, parse_quota_text
from gateway.tower.records import StoreError

# `keys update --clear-X` removes a restriction: flag name -> metadata member.
CLEARED: Final = {
    "clear_allowed_ips": "allowed_ips",
    "clear_allowed_origins": "allowed_origins",
    "clear_quota": "quota",
    "clear_limit_scope": "rate_limit_scope",
}


def add_restriction_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-ip",
        action="append",
        default=None,
        metavar="CIDR",
        help="a client address or CIDR block the key works from (repeatable)",
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=None,
        metavar="O",
        help="a browser origin (scheme://host[:port]) the key works from (repeatable)",
    )
    parser.add_argument(
        "--quota", default=None, metavar="N/PERIOD", help="at most N requests per day or month"
    )
    parser.add_argument(
        "--limit-scope",
        choices=SCOPES,
        default=None,
        help="whose requests share the rate limit and the quota",
    )


def restrictions(args: argparse.Namespace) -> dict[str, Any]:
    """The metadata members the flags set; raises `StoreError` naming a bad flag."""
    meta: dict[str, Any] = {}
    if args.allow_ip:
        for entry in args.allow_ip:
            try:
                ip_network(entry)
            except ValueError as exc:
                raise StoreError(f"--allow-ip {entry!r}: {exc}") from None
        meta["allowed_ips"] = list(args.allow_ip)
    if args.allow_origin:
        for entry in args.allow_origin:
            if normalise_origin(entry) is None:
                raise StoreError(
                    f"--allow-origin {entry!r}: not an origin like https://app.example.com"
                )
        meta["allowed_origins"] = list(args.allow_origin)
    if args.quota is not None:
        try:
            quota = parse_quota_text(args.quota)
        except ValueError:
            raise StoreError(
                f"--quota {args.quota!r}: expected N/day or N/month with N from 1"
            ) from None
        meta["quota"] = {"limit": quota.limit, "period": quota.period}
    if args.limit_scope is not None:
        meta["rate_limit_scope"] = args.limit_scope
    return meta


def restriction_lines(metadata: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, value) lines for `keys create` and `keys show`."""
    lines = []
    if metadata.get("allowed_ips"):
        lines.append(("ips", ", ".join(metadata["allowed_ips"])))
    if metadata.get("allowed_origins"):
        lines.append(("origins", ", ".join(metadata["allowed_origins"])))
    quota = metadata.get("quota")
    if isinstance(quota, Mapping):
        lines.append(("quota", f"{quota.get('limit')}/{quota.get('period')}"))
    if metadata.get("rate_limit_scope"):
        lines.append(("scope", str(metadata["rate_limit_scope"])))
    return lines


def restriction_summary(metadata: Mapping[str, Any]) -> str:
    """One cell of `keys list`: `ips:2 origins:1 quota:100/day scope:user`, or `-`."""
    parts = []
    for name, label in (("allowed_ips", "ips"), ("allowed_origins", "origins")):
        if metadata.get(name):
            parts.append(f"{label}:{len(metadata[name])}")
    quota = metadata.get("quota")
    if isinstance(quota, Mapping):
        parts.append(f"quota:{quota.get('limit')}/{quota.get('period')}")
    if metadata.get("rate_limit_scope"):
        parts.append(f"scope:{metadata['rate_limit_scope']}")
    return " ".join(parts) or "-"
