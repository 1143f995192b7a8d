"""The Kubernetes examples of decision mode (config/k8s/decision): they parse, hang
together, carry a gateway.yaml that loads, and pass kubernetes-validate where a schema
exists (the built-in kinds; Traefik's and Istio's CRDs have none there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.config import parse_config_text

ROOT = Path(__file__).resolve().parents[2]
DIRECTORY = ROOT / "config" / "k8s" / "decision"
ENV = {
    "TOWER_API_KEY": "k",
    "TOWER_SECRET": "s",
    "GATEWAY_JWT_SECRET": "j" * 32,
    "GATEWAY_ADMIN_TOKEN": "a" * 16,
    "GATEWAY_FINGERPRINT_SECRET": "f" * 32,
}
BUILT_IN = ("v1", "apps/v1", "networking.k8s.io/v1")


def documents() -> list[dict[str, Any]]:
    found = []
    for path in sorted(DIRECTORY.glob("*.yaml")):
        found += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return found


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def test_examples_cover_the_three_ingresses() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for d in documents()}
    assert ("networking.k8s.io/v1", "Ingress") in kinds
    assert ("traefik.io/v1alpha1", "Middleware") in kinds
    assert ("security.istio.io/v1", "AuthorizationPolicy") in kinds


def test_decision_gateway_config_loads_decision_only() -> None:
    config_map = next(
        d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "tower-gateway-decision-config"
    )
    config = parse_config_text(config_map["data"]["gateway.yaml"], env=ENV)
    assert config.decision is not None and config.decision.port == 9092
    assert not config.server.enabled
    assert config.decision.allow_from
    service = next(d for d in by_kind("Service") if d["metadata"]["name"].endswith("decision"))
    assert service["spec"]["ports"][0]["port"] == 9092
    policy = by_kind("NetworkPolicy")[0]
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": 9092, "protocol": "TCP"}]


def test_ingress_nginx_asks_the_decision_listener() -> None:
    annotations = by_kind("Ingress")[0]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/auth-url"].endswith(":9092/auth")
    headers = annotations["nginx.ingress.kubernetes.io/auth-response-headers"]
    assert [h.strip() for h in headers.split(",")] == ["Authorization", "X-Request-Id"]


def test_traefik_middlewares_chain_scrub_decide_strip() -> None:
    middlewares = {d["metadata"]["name"]: d["spec"] for d in by_kind("Middleware")}
    forward = middlewares["tower-gateway-decision"]["forwardAuth"]
    assert forward["address"].endswith(":9092/auth")
    assert forward["trustForwardHeader"] is False
    assert "Authorization" in forward["authResponseHeaders"]
    route = by_kind("IngressRoute")[0]["spec"]["routes"][0]
    assert [m["name"] for m in route["middlewares"]] == [
        "tower-gateway-scrub",
        "tower-gateway-decision",
        "tower-gateway-strip-key",
    ]
    assert {m["name"] for m in route["middlewares"]} <= set(middlewares)


def test_istio_provider_and_policy_agree() -> None:
    mesh_map = next(d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "istio")
    mesh = yaml.safe_load(mesh_map["data"]["mesh"])
    provider = mesh["extensionProviders"][0]
    http = provider["envoyExtAuthzHttp"]
    assert http["pathPrefix"] == "/ext_authz" and http["port"] == 9092
    assert http["failOpen"] is False
    assert "authorization" in http["headersToUpstreamOnAllow"]
    assert {"www-authenticate", "retry-after"} <= set(http["headersToDownstreamOnDeny"])
    policy = by_kind("AuthorizationPolicy")[0]["spec"]
    assert policy["action"] == "CUSTOM"
    assert policy["provider"]["name"] == provider["name"]


def test_built_in_kinds_pass_kubernetes_validate() -> None:
    import kubernetes_validate  # the test extra pins it; its schemas ship in the wheel

    version = kubernetes_validate.latest_version()
    checked = 0
    for document in documents():
        if document["apiVersion"] in BUILT_IN:
            kubernetes_validate.validate(document, version, strict=True)
            checked += 1
    assert checked >= 6
