"""What `explain` adds in decision mode: the answer the decision listener gives a data
plane for the explained request, and for how long the data plane may reuse an allow."""

from __future__ import annotations

import math
from typing import Any

from gateway.config import Config


def decision_mode(config: Config, now: float, answer: dict[str, Any]) -> None:
    """Adds `decision_mode` to an explain answer when a decision listener is configured."""
    settings = config.decision
    if settings is None:
        return
    status = answer.get("status")
    seconds = 0
    if status == 200 and answer.get("decision") == "allow":
        limit = min(settings.cache_ttl, config.jwt.ttl)
        identity = answer.get("identity") or {}
        expires_at = identity.get("expires_at")
        if isinstance(expires_at, int | float):
            limit = min(limit, expires_at - now)
        seconds = max(0, math.floor(limit))
    answer["decision_mode"] = {
        "listener": f"{settings.host}:{settings.port}",
        "status": status,
        "cache_control": f"private, max-age={seconds}" if seconds > 0 else "no-store",
        "note": "rate limits count decisions: an allow a data plane reuses is not counted",
    }
