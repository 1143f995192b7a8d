"""The parts of a decision that a config reload replaces all at once (`Components`).

A request reads `Gateway.components` once when it starts and finishes on that
snapshot, so it sees all of the old config or all of the new, never a mix.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from multidict import istr

from gateway.auth.capabilities import CapabilityMapper
from gateway.auth.credentials import CredentialExtractor
from gateway.auth.routes import RouteTable
from gateway.config import Config
from gateway.http.forwarded import IPNetwork
from gateway.http.headers import HeaderPolicy

WWW_AUTHENTICATE: Final = 'Bearer realm="tower-gateway", ApiKey header="X-API-Key"'


@dataclass(frozen=True, slots=True)
class Components:
    """Everything a request needs that a config reload may replace at once."""

    config: Config
    routes: RouteTable
    extractor: CredentialExtractor
    mapper: CapabilityMapper
    headers: HeaderPolicy
    www_authenticate: str
    jwt_header: istr  # `jwt.header`, case-folded once
    trusted_proxies: tuple[IPNetwork, ...] = ()


def build_components(config: Config) -> Components:
    extractor = CredentialExtractor(
        config.credentials.sources, max_length=config.credentials.max_key_length
    )
    blocked = [config.jwt.header, *extractor.header_names]
    return Components(
        config=config,
        routes=RouteTable(config.routes, audience=config.jwt.audience),
        extractor=extractor,
        mapper=CapabilityMapper(config),
        headers=HeaderPolicy(blocked),
        www_authenticate=WWW_AUTHENTICATE,
        jwt_header=istr(config.jwt.header),
        trusted_proxies=tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in config.server.trusted_proxies
        ),
    )
