"""The OpenAPI description of the embedded tower's key API (`gateway.ops.keys_api`) and its
page (`gateway.ops.admin_ui`), part of `GET /admin/openapi.json` (`gateway.ops.openapi`)."""

from __future__ import annotations

from typing import Any, Final

from gateway.ops.admin_ui import ASSETS as UI_ASSETS
from gateway.ops.keys_api import MAX_BODY as MAX_KEY_BODY
from gateway.ops.openapi_parts import JSON, answer, error, obj, op, ref
from gateway.tower import MAX_FIELD_LENGTH, MAX_SCOPES
from gateway.tower.keys_ops import STATUSES

_NULLABLE_TIME: Final = {"type": ["number", "null"], "description": "epoch seconds"}
KEY_SCHEMA: Final = {
    "type": "object",
    "description": "A key of the embedded tower; never its secret",
    "properties": {
        "key_id": {"type": "string"},
        "prefix": {"type": "string", "description": "the key's first characters, to recognise it"},
        "user_id": {"type": "string"},
        "role": {"type": "string"},
        "scopes": {"type": "array", "items": {"type": "string"}},
        "env": {"enum": ["test", "live"]},
        "status": {"enum": list(STATUSES)},
        "created_at": {"type": "number"},
        "expires_at": _NULLABLE_TIME,
        "last_used_at": _NULLABLE_TIME,
        "requests": {"type": "integer", "minimum": 0},
        "team": {"type": ["string", "null"]},
        "rate_limit": {"type": ["number", "null"], "description": "requests per minute"},
        "revoked_at": _NULLABLE_TIME,
        "revoke_reason": {"type": ["string", "null"]},
        "grace_until": _NULLABLE_TIME,
        "rotated_to": {"type": ["string", "null"]},
    },
}
_TEXT: Final = {"type": "string", "minLength": 1, "maxLength": MAX_FIELD_LENGTH}
_SCOPES: Final = {"type": "array", "maxItems": MAX_SCOPES, "items": _TEXT}
_NEW_KEY: Final = {
    "type": "object",
    "properties": {
        "user_id": _TEXT,
        "role": _TEXT,
        "scopes": _SCOPES,
        "expires_in_days": {"type": ["number", "null"], "exclusiveMinimum": 0},
        "env": {"enum": ["test", "live"], "default": "test"},
        "rate_limit": {"type": ["number", "null"], "exclusiveMinimum": 0},
        "team": {"type": ["string", "null"]},
    },
    "required": ["user_id", "role"],
    "additionalProperties": False,
}
_KEY_CHANGE: Final = {
    "type": "object",
    "properties": {
        "role": _TEXT,
        "scopes": _SCOPES,
        "expires_at": {**_NULLABLE_TIME, "description": "epoch seconds; null: never expires"},
        "expires_in_days": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "description": "instead of expires_at: that many days from now",
        },
        "rate_limit": {"type": ["number", "null"], "exclusiveMinimum": 0},
        "team": {"type": ["string", "null"]},
    },
    "minProperties": 1,
    "additionalProperties": False,
}
_ISSUED: Final = obj(
    key={"type": "string", "description": "the raw key: shown this once, never again"},
    record=ref("Key"),
)
_CHANGED: Final = obj(
    record=ref("Key"),
    dropped_entries={"type": "integer", "minimum": 0},
    workers_missing={
        "type": "array",
        "items": {"type": "integer"},
        "description": "`--workers N`: workers that did not confirm dropping the key's cache",
    },
)


def _created(op_id: str, summary: str, **more: Any) -> dict[str, Any]:
    """An operation that answers 201 (its `responses` holds it), never 200."""
    created = op(op_id, summary, {}, **more)
    del created["responses"]["200"]
    return created


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": schema}}}


def _key_refusals(*codes: str) -> dict[str, Any]:
    texts = {
        "400": "A field is invalid; `field` names it",
        "409": "The key's state forbids it (revoked, rotated)",
        "413": f"The body is over {MAX_KEY_BODY // 1024} KiB",
        "415": "The body is not application/json",
        "503": "The key store cannot answer now",
    }
    return {code: error(texts[code]) for code in codes}


def key_paths() -> dict[str, Any]:
    key_id = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
    writes = ("400", "413", "415", "503")
    query = [
        {"name": "user_id", "in": "query", "schema": {"type": "string"}},
        {"name": "role", "in": "query", "schema": {"type": "string"}},
        {"name": "status", "in": "query", "schema": {"enum": list(STATUSES)}},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
    ]
    note = "404 also without the embedded tower (`tower.local`), or for an unknown key_id."
    ui_note = (
        "Served without the bearer: a browser cannot send it when navigating, and the page "
        "holds no data. 404 without an admin token or `tower.local`."
    )
    html = {"description": "The page", "content": {"text/html": {"schema": {"type": "string"}}}}
    return {
        "/admin/keys": {
            "get": op(
                "keysList",
                "The embedded tower's keys, filtered and paged, never a secret",
                answer(
                    "The keys",
                    obj(
                        keys={"type": "array", "items": ref("Key")},
                        total={"type": "integer", "minimum": 0},
                        offset={"type": "integer"},
                        limit={"type": ["integer", "null"]},
                    ),
                ),
                parameters=query,
                description=note,
                responses=_key_refusals("400", "503"),
            ),
            "post": _created(
                "keyCreate",
                "Create a key; the answer holds it, shown this once",
                requestBody=_body(_NEW_KEY),
                description=note,
                responses={"201": answer("Created", _ISSUED), **_key_refusals(*writes)},
            ),
        },
        "/admin/keys/{key_id}": {
            "get": op(
                "keyShow",
                "One key and its request counts",
                answer(
                    "The key",
                    obj(
                        record=ref("Key"),
                        usage=obj(
                            requests={"type": "integer"},
                            last_used_at=_NULLABLE_TIME,
                            statuses={
                                "type": ["object", "null"],
                                "description": "by HTTP status; null until the store keeps it",
                            },
                        ),
                    ),
                ),
                parameters=[key_id],
                description=note,
                responses=_key_refusals("503"),
            ),
            "patch": op(
                "keyUpdate",
                "Change role, scopes, expiry, rate limit or team; cached copies are dropped",
                answer("Changed", _CHANGED),
                parameters=[key_id],
                requestBody=_body(_KEY_CHANGE),
                description=note,
                responses=_key_refusals("409", *writes),
            ),
        },
        "/admin/keys/{key_id}/revoke": {
            "post": op(
                "keyRevoke",
                "Revoke: refused at once here, by every worker and, with Redis, every replica",
                answer("Revoked", _CHANGED),
                parameters=[key_id],
                requestBody=_body(
                    {
                        "type": "object",
                        "properties": {"reason": {**_TEXT, "default": "revoked"}},
                        "additionalProperties": False,
                    }
                ),
                description=note,
                responses=_key_refusals(*writes),
            )
        },
        "/admin/keys/{key_id}/rotate": {
            "post": _created(
                "keyRotate",
                "A new key with the same grants; the old one works `grace_hours` more",
                parameters=[key_id],
                requestBody=_body(
                    {
                        "type": "object",
                        "properties": {
                            "grace_hours": {"type": "number", "minimum": 0, "default": 24}
                        },
                        "additionalProperties": False,
                    }
                ),
                description=note,
                responses={
                    "201": answer(
                        "Rotated",
                        {
                            **_ISSUED,
                            "properties": {
                                **_ISSUED["properties"],
                                "previous": ref("Key"),
                                "dropped_entries": {"type": "integer", "minimum": 0},
                            },
                        },
                    ),
                    **_key_refusals("409", *writes),
                },
            )
        },
        "/admin/ui": {
            "get": {
                "operationId": "keysPage",
                "summary": "The key-management web page",
                "description": ui_note,
                "security": [],
                "responses": {"200": html, "404": {"$ref": "#/components/responses/Disabled"}},
            }
        },
        "/admin/ui/{asset}": {
            "get": {
                "operationId": "keysPageAsset",
                "summary": "The page's script, style sheet and icon",
                "description": ui_note,
                "security": [],
                "parameters": [
                    {
                        "name": "asset",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": sorted(UI_ASSETS)},
                    }
                ],
                "responses": {
                    "200": {"description": "The file"},
                    "404": {"$ref": "#/components/responses/Disabled"},
                },
            }
        },
    }
