"""An Envoy bootstrap YAML in front of the decision listener (HTTP ext_authz service).

Envoy sends each request's method and headers to `/ext_authz{path}` and, on a
denial, returns the decision's own status, body and the headers listed in
`allowed_client_headers` to the client; on an allow it sets the headers in
`allowed_upstream_headers` (the JWT) on the request. Headers a client must not
forge are removed before the check, the key headers per route after it (on a
public route the JWT header too, since the decision sends none there).

No Envoy binary runs in the tests: the output is checked as YAML against the
structure of Envoy's v3 API for the fields it uses.
"""

from __future__ import annotations

from typing import Any

import yaml

from gateway.decision.dataplane.common import Plan
from gateway.decision.listener import TOKEN_HEADER

HCM = (
    "type.googleapis.com/envoy.extensions.filters.network."
    "http_connection_manager.v3.HttpConnectionManager"
)
EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
MUTATION = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
CLIENT_HEADERS = (
    "www-authenticate",
    "retry-after",
    "x-request-id",
    "allow",
    "cache-control",
    "content-type",
    "x-content-type-options",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
)


def _exact(names: list[str]) -> list[dict[str, Any]]:
    return [{"exact": name.lower(), "ignore_case": True} for name in names]


def _cluster(name: str, address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {
        "name": name,
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": host.strip("[]"),
                                        "port_value": int(port),
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def document(plan: Plan) -> dict[str, Any]:
    jwt = plan.jwt_header.lower()
    keys = [h.lower() for h in plan.key_headers]
    # Removed before the check: all a client must not forge but the key headers it reads.
    scrub = [h.lower() for h in plan.stripped() if h.lower() not in keys]
    after_auth = [k for k in keys if k != jwt]
    public_after = sorted({*keys, jwt})
    routes: list[dict[str, Any]] = []
    for route in plan.config.routes:
        match: dict[str, Any] = (
            {"prefix": "/"} if route.path == "/" else {"path_separated_prefix": route.path}
        )
        routes.append(
            {
                "name": route.name,
                "match": match,
                "route": {"cluster": "upstream", "timeout": f"{route.timeout:g}s"},
                "request_headers_to_remove": public_after if not route.auth else after_auth,
            }
        )
    if not any(r["match"].get("prefix") == "/" for r in routes):
        routes.append(
            {
                "match": {"prefix": "/"},
                "route": {"cluster": "upstream"},
                "request_headers_to_remove": after_auth,
            }
        )
    token = plan.decision.token
    server_headers: list[dict[str, Any]] = []
    if token is not None:
        server_headers.append({"key": TOKEN_HEADER, "value": token})
    http_filters = [
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": MUTATION,
                "mutations": {
                    "request_mutations": [{"remove": name} for name in scrub],
                },
            },
        },
        {
            "name": "envoy.filters.http.ext_authz",
            "typed_config": {
                "@type": EXT_AUTHZ,
                "transport_api_version": "V3",
                "failure_mode_allow": False,
                "status_on_error": {"code": 503},
                "http_service": {
                    "server_uri": {
                        "uri": f"http://{plan.decision_address}",
                        "cluster": "tower_gateway_decision",
                        "timeout": f"{plan.config.tower.timeout + 1:g}s",
                    },
                    "path_prefix": "/ext_authz",
                    "authorization_request": {
                        "allowed_headers": {
                            "patterns": _exact(
                                [*keys, "x-request-id", "origin", "upgrade", "x-forwarded-for"]
                            )
                        },
                        "headers_to_add": server_headers,
                    },
                    "authorization_response": {
                        "allowed_upstream_headers": {
                            "patterns": _exact([plan.jwt_header, "x-request-id"])
                        },
                        "allowed_client_headers": {"patterns": _exact(list(CLIENT_HEADERS))},
                    },
                },
            },
        },
        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
    ]
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "tower_gateway",
                    "address": {
                        "socket_address": {
                            "address": plan.listen_host,
                            "port_value": plan.listen_port,
                        }
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "tower_gateway",
                                        "use_remote_address": True,
                                        "normalize_path": True,
                                        "merge_slashes": True,
                                        "upgrade_configs": [{"upgrade_type": "websocket"}],
                                        "route_config": {
                                            "name": "tower_gateway",
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": routes,
                                                }
                                            ],
                                        },
                                        "http_filters": http_filters,
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                _cluster("tower_gateway_decision", plan.decision_address),
                _cluster("upstream", plan.upstream_host),
            ],
        }
    }


def render(plan: Plan) -> str:
    header = [
        "# Envoy bootstrap for the tower-gateway decision listener (HTTP ext_authz);",
        "# generated by tower-gateway dataplane envoy --config ... Run: envoy -c THIS_FILE",
        f"# Decision listener: {plan.decision_address}; upstream: {plan.upstream_host}.",
        "# Denials reach the client with the decision's status, JSON body and headers;",
        "# a decision service that does not answer gives 503 (status_on_error).",
    ]
    body = yaml.safe_dump(document(plan), sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body
