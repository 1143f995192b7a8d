"""What every generated data-plane configuration is derived from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from gateway.config import INTENT_HEADERS, Config, DecisionConfig
from gateway.errors import ConfigError
from gateway.http.headers import IDENTITY_HEADERS

# Data-plane plumbing a client must never set for the upstream or the decision.
PLUMBING: Final = ("X-Tower-Gateway-Decision-Token", "X-Tower-Gateway-Jwt")
# Statuses a decision can answer besides 200, all re-emitted as they are.
DENIAL_STATUSES: Final = (400, 401, 403, 404, 405, 429, 500, 503)
DECISION_DOWN: Final = (
    '{"error": "decision_unavailable", "detail": "the decision service did not answer"}'
)


def too_large(limit: int) -> str:
    """The proxy listener's 413 body for `server.max_body_size`."""
    return json.dumps(
        {"error": "body_too_large", "detail": f"request body larger than {limit} bytes"}
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """The inputs of a data-plane configuration."""

    config: Config
    decision: DecisionConfig
    upstream_host: str  # host:port
    upstream_scheme: str
    listen_host: str
    listen_port: int
    workers: int | None = None

    @property
    def decision_address(self) -> str:
        host = self.decision.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.decision.port}"

    @property
    def jwt_header(self) -> str:
        return self.config.jwt.header

    @property
    def key_headers(self) -> list[str]:
        """Headers that carry the client's key, removed before the upstream."""
        names = {"x-api-key": "X-API-Key", "authorization": "Authorization"}
        return [names[s] for s in self.config.credentials.sources]

    def stripped(self) -> list[str]:
        """Every client header the upstream must not get (the JWT header is set after)."""
        seen: dict[str, str] = {}
        for name in [
            *self.key_headers,
            self.jwt_header,
            *sorted(IDENTITY_HEADERS),
            # Intent headers (CONTRACT 10); a route's `forward_headers` is not applied here.
            *sorted(INTENT_HEADERS),
            *PLUMBING,
            "X-Gateway-Shadow-Decision",
            "X-Real-IP",
            "Forwarded",
        ]:
            seen.setdefault(name.lower(), _title(name))
        return list(seen.values())


def _title(name: str) -> str:
    return "-".join(part[:1].upper() + part[1:] for part in name.split("-"))


def make_plan(config: Config, upstream: str, listen: str, workers: int | None = None) -> Plan:
    """Checks the command's arguments against the config; raises `ConfigError`."""
    if config.decision is None:
        raise ConfigError("decision", "is not set: the data plane needs a decision listener")
    parts = urlsplit(upstream)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ConfigError("--upstream", "must be http(s)://host:port without a path")
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("--listen", "must be HOST:PORT")
    return Plan(
        config=config,
        decision=config.decision,
        upstream_host=parts.netloc,
        upstream_scheme=parts.scheme,
        listen_host=host or "0.0.0.0",
        listen_port=int(port),
        workers=workers,
    )
