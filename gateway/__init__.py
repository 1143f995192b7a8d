"""tower-gateway: an authenticating reverse proxy that turns API keys into internal JWTs."""

__version__ = "0.1.0"
