"""Building blocks of the admin API's OpenAPI document: `gateway.ops.openapi` and
`gateway.ops.keys_openapi` build their paths with them."""

from __future__ import annotations

from typing import Any, Final

JSON: Final = "application/json"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def error(description: str) -> dict[str, Any]:
    return answer(description, ref("Error"))


# Every admin operation may answer these (gateway.ops.listener.admin_guard).
GUARD: Final = {
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "404": {"$ref": "#/components/responses/Disabled"},
}


def op(op_id: str, summary: str, ok: dict[str, Any], **more: Any) -> dict[str, Any]:
    responses = {"200": ok, **more.pop("responses", {}), **GUARD}
    return {"operationId": op_id, "summary": summary, **more, "responses": responses}


def obj(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties}
