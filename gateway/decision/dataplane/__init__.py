"""Configurations for the data planes in front of the decision listener (`tower-gateway
dataplane nginx|caddy|envoy|traefik`), derived from gateway.yaml."""
