"""The checks of a key's own restrictions (CONTRACT section 11), called by `decide()`.

`check()` refuses a request from an address or an origin the key's record does not allow, and
every request of a key whose restrictions could not be read (fail closed). `bucket()` names
whose requests share the rate limit and the quota (`rate_limit_scope`).
"""

from __future__ import annotations

import logging
from typing import Final

from gateway.auth.identity import Resolved
from gateway.errors import Forbidden
from gateway.tower.constraints import Constraints, normalise_origin

log = logging.getLogger(__name__)

MISCONFIGURED: Final = "key_misconfigured"


def check(constraints: Constraints, client: str | None, origin: str | None) -> None:
    """Raises `Forbidden` when the key may not be used from here; the caller checked
    `constraints.restricted` first."""
    if constraints.malformed is not None:
        raise Forbidden(
            "The key's restrictions cannot be read; it is unusable until its record is fixed",
            reason=MISCONFIGURED,
        )
    ips = constraints.ips
    if ips is not None and not ips.allows(client):
        raise Forbidden("This key may not be used from this address", reason="ip_not_allowed")
    origins = constraints.origins
    if origins is not None and origin is not None and normalise_origin(origin) not in origins:
        raise Forbidden("This key may not be used from this origin", reason="origin_not_allowed")


def report_malformed(resolved: Resolved, fingerprint: str | None) -> bool:
    """Logs a key whose restrictions are malformed, once per tower answer (not per request);
    True when it did (the caller counts it)."""
    if resolved.source != "tower":
        return False
    log.warning(
        "key %s is unusable: its tower record's restrictions are malformed (%s)",
        fingerprint,
        resolved.identity.constraints.malformed,
    )
    return True


def bucket(resolved: Resolved) -> str:
    """Whose requests share the rate limit and the quota: the key, its user or its team.

    A team scope for a key without a team falls back to its user (never to one shared bucket).
    """
    identity = resolved.identity
    scope = identity.constraints.scope
    if scope == "user" or (scope == "team" and identity.team is None):
        return "user:" + identity.user_id
    if scope == "team":
        return "team:" + str(identity.team)
    return resolved.digest.hex()
