"""The OpenAPI 3.1 document of the ops listener's admin API (`GET /admin/openapi.json`).

It sits behind the same admin guard as every other `/admin/*` path: the
contract gives `/admin/*` one rule (the bearer, 401 without it, 404 when no
token is configured), and an operator who can call the API can read its
description. tests/test_openapi.py holds the document to the routes the ops
app registers, both ways, so neither can change without the other.
"""

from __future__ import annotations

from typing import Any, Final

from gateway import __version__
from gateway.ops.audit import DEFAULT_LIMIT, MAX_LIMIT
from gateway.ops.keys_openapi import KEY_SCHEMA, key_paths
from gateway.ops.openapi_parts import JSON as _JSON
from gateway.ops.openapi_parts import answer as _answer
from gateway.ops.openapi_parts import error as _error
from gateway.ops.openapi_parts import obj as _object
from gateway.ops.openapi_parts import op as _op
from gateway.replicas.webhook import (
    MAX_KEY_ID_LENGTH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WEBHOOK_MAX_AGE,
    WEBHOOK_MAX_KEY_IDS,
)

OPENAPI_PATH: Final = "/admin/openapi.json"

_CACHE_STATS: Final = _object(
    **{
        name: {"type": "integer", "minimum": 0}
        for name in (
            "total_cached_keys",
            "valid_cached_keys",
            "negative_cached_keys",
            "hits",
            "misses",
            "negative_hits",
            "stale_serves",
            "evictions",
            "single_flight_waiters",
            "tower_calls",
            "shared_hits",
            "max_entries",
        )
    },
    cache_hit_ratio={"type": "number", "minimum": 0, "maximum": 1},
)

_RELOAD: Final = _object(
    reloaded={"type": "boolean"},
    source={"type": "string"},
    changed={"type": "array", "items": {"type": "string"}},
    restart_required={"type": "array", "items": {"type": "string"}},
    warning={"type": "string"},
    error={"const": "invalid_config"},
    detail={"type": ["string", "null"]},
    path={"type": ["string", "null"]},
)

_EXPLAIN_QUERY: Final = {
    "type": "object",
    "properties": {
        "key": {"type": "string", "minLength": 1, "description": "never logged or echoed"},
        "fingerprint": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
        "method": {"type": "string", "default": "GET", "pattern": "^[A-Za-z]{1,32}$"},
        "path": {"type": "string", "minLength": 1},
    },
    "required": ["path"],
    "oneOf": [{"required": ["key"]}, {"required": ["fingerprint"]}],
    "additionalProperties": False,
}


def admin_openapi(*, workers: bool = False) -> dict[str, Any]:
    """The document; paths are exactly the `/admin/*` routes of the ops listener
    (`gateway.ops.create_ops_app`), or with `workers` of the supervisor's
    (`gateway.runtime.group_ops.create_group_ops_app`)."""
    cache_key = {
        "name": "key_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    paths: dict[str, Any] = {
        "/admin/cache": {
            "get": _op(
                "cacheStats", "Identity cache statistics", _answer("The counts", _CACHE_STATS)
            ),
            "delete": _op(
                "cacheClear",
                "Drop every cached identity (here and, with Redis, on every replica)",
                _answer("Cleared", _object(cleared={"const": True})),
            ),
        },
        "/admin/cache/{key_id}": {
            "delete": _op(
                "cacheDrop",
                "Drop one key's cached identities (here and, with Redis, on every replica)",
                _answer(
                    "Dropped",
                    _object(
                        key_id={"type": "string"},
                        dropped_entries={"type": "integer", "minimum": 0},
                    ),
                ),
                parameters=[cache_key],
            )
        },
        "/admin/revocations": {
            "post": _op(
                "revocationWebhook",
                "The tower's signed revocation webhook (needs admin.webhook_secret)",
                _answer(
                    "Revoked",
                    _object(
                        revoked={"type": "integer", "minimum": 0},
                        dropped_entries={"type": "integer", "minimum": 0},
                    ),
                ),
                description=(
                    f"`{SIGNATURE_HEADER}: sha256=<hex HMAC-SHA256 of "
                    f"'<timestamp>.<body>'>` and `{TIMESTAMP_HEADER}: <epoch seconds>`, "
                    f"at most {WEBHOOK_MAX_AGE} s old. 404 also when no webhook secret "
                    "is configured; 401 `bad_signature` on a missing, wrong or stale "
                    "signature."
                ),
                parameters=[
                    {
                        "name": SIGNATURE_HEADER,
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^sha256=[0-9a-f]{64}$"},
                    },
                    {
                        "name": TIMESTAMP_HEADER,
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9]+$"},
                    },
                ],
                requestBody={
                    "required": True,
                    "content": {
                        _JSON: {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "key_ids": {
                                        "type": "array",
                                        "maxItems": WEBHOOK_MAX_KEY_IDS,
                                        "items": {
                                            "type": "string",
                                            "minLength": 1,
                                            "maxLength": MAX_KEY_ID_LENGTH,
                                        },
                                    }
                                },
                                "required": ["key_ids"],
                            }
                        }
                    },
                },
                responses={"400": _error("The body is not a JSON object with key_ids")},
            )
        },
        "/admin/audit": {
            "get": _op(
                "auditRecent",
                "Recent audit events, newest first",
                _answer(
                    "The events",
                    _object(events={"type": "array", "items": {"type": "object"}}),
                ),
                parameters=[
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_LIMIT,
                            "default": DEFAULT_LIMIT,
                        },
                    }
                ],
                responses={"400": _error("limit out of range")},
            )
        },
        "/admin/config": {
            "get": _op(
                "configInEffect",
                "The config in effect, every secret redacted",
                _answer(
                    "The config (shaped as config/gateway.schema.json)",
                    _object(
                        source={"type": "string"},
                        config={"type": "object"},
                        last_reload={"anyOf": [_RELOAD, {"type": "null"}]},
                    ),
                ),
            )
        },
        "/admin/explain": {
            "post": _op(
                "explain",
                "The decision for a key (or a cached fingerprint), a method and a path, and why",
                _answer("The decision", {"type": "object"}),
                requestBody={"required": True, "content": {_JSON: {"schema": _EXPLAIN_QUERY}}},
                responses={
                    "400": _error("The body is not a valid query"),
                    "413": _error("The body is over 16 KiB"),
                },
            )
        },
        "/admin/reload": {
            "post": _op(
                "reload",
                "Re-read the config file, as SIGHUP does",
                _answer("Reloaded", _RELOAD),
                responses={
                    "422": _answer("The new config is invalid; the old one runs on", _RELOAD)
                },
            )
        },
        **key_paths(),
        OPENAPI_PATH: {
            "get": _op(
                "openapi",
                "This document",
                _answer("OpenAPI 3.1", {"type": "object"}),
            )
        },
    }
    if workers:
        paths["/admin/workers"] = {
            "get": _op(
                "workers",
                "The supervisor's pid and each worker's slot (`serve --workers N`)",
                _answer(
                    "The workers",
                    _object(
                        pid={"type": "integer"},
                        workers={"type": "array", "items": {"type": "object"}},
                    ),
                ),
            )
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tower-gateway admin API",
            "version": __version__,
            "description": (
                "On the ops listener. Every path needs `Authorization: Bearer <admin.token>`; "
                "with no admin token configured, every path answers 404."
            ),
        },
        "security": [{"adminToken": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {"type": "string"},
                        "detail": {"type": "string"},
                        "field": {"type": "string", "description": "the refused input (keys)"},
                    },
                    "required": ["error", "detail"],
                },
                "Key": KEY_SCHEMA,
            },
            "responses": {
                "Unauthorized": _error("No admin bearer token, or a wrong one"),
                "Disabled": _error("The admin API is disabled: no admin token configured"),
            },
        },
    }
