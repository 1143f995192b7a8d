"""The adversarial suite: hostile clients and hostile towers against the gateway."""
