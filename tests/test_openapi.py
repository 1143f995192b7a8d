"""`GET /admin/openapi.json`: an OpenAPI 3.1 document of exactly the admin routes served."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
from aiohttp import hdrs, web
from aiohttp.test_utils import TestClient, TestServer

from gateway.ops.openapi import OPENAPI_PATH, admin_openapi
from gateway.runtime.group_ops import create_group_ops_app
from gateway.runtime.workers import WorkerGroup
from tests.conftest import ADMIN_TOKEN, Harness, gateway_config

METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def registered_admin_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every `/admin` route an ops app registers; HEAD rides on
    GET (aiohttp adds it to every GET route) and is not listed separately, nor is the
    supervisor's catch-all that forwards any other `/admin/*` path to its workers."""
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        forwarded = path == "/admin/{tail}"
        if path.startswith("/admin") and route.method != hdrs.METH_HEAD and not forwarded:
            routes.add((route.method.lower(), path))
    return routes


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


async def test_the_document_lists_every_admin_route_and_no_other(gw: Harness) -> None:
    response = await gw.ops.get(OPENAPI_PATH, headers=gw.admin_headers())
    assert response.status == 200
    assert response.content_type == "application/json"
    document = await response.json()
    assert document["openapi"].startswith("3.1.")
    registered = registered_admin_routes(gw.gateway.ops_app())
    assert ("get", OPENAPI_PATH) in registered and ("delete", "/admin/cache/{key_id}") in registered
    assert documented_routes(document) == registered


def test_the_document_is_well_formed() -> None:
    document = admin_openapi(workers=True)
    operation_ids = [
        op["operationId"]
        for item in document["paths"].values()
        for method, op in item.items()
        if method in METHODS
    ]
    assert len(operation_ids) == len(set(operation_ids))
    # Request and response schemas are JSON Schema 2020-12, as OpenAPI 3.1 says.
    for path, item in document["paths"].items():
        for op in item.values():
            bodies = [op.get("requestBody", {}), *op["responses"].values()]
            for body in bodies:
                for media in body.get("content", {}).values():
                    schema = {"components": document["components"], **media["schema"]}
                    jsonschema.Draft202012Validator.check_schema(schema)
            for parameter in op.get("parameters", []):
                jsonschema.Draft202012Validator.check_schema(parameter["schema"])
            codes = set(op["responses"])
            assert codes & {"200", "201"} and "404" in codes
            # Only the key page is served without the bearer (a browser navigating cannot
            # send it); every other operation answers 401 without it.
            assert ("401" in codes) == (op.get("security") != [])
            if op.get("security") == []:
                assert path.startswith("/admin/ui")


async def test_the_document_needs_the_admin_token(gw: Harness) -> None:
    response = await gw.ops.get(OPENAPI_PATH)
    assert response.status == 401
    wrong = await gw.ops.get(OPENAPI_PATH, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status == 401


async def test_the_document_is_gone_with_the_admin_api(make_gateway: Any) -> None:
    harness = await make_gateway(admin={"token": ""})
    assert harness.gateway.config.admin.token is None
    response = await harness.ops.get(OPENAPI_PATH, headers=harness.admin_headers())
    assert response.status == 404


async def test_the_supervisor_documents_its_own_admin_routes(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[TestClient]]
) -> None:
    # `serve --workers N`: the parent's ops listener adds /admin/workers; never started here.
    config = gateway_config("http://127.0.0.1:9", "http://127.0.0.1:9")
    group = WorkerGroup(config, str(tmp_path / "gateway.yaml"), 2, socket_dir=str(tmp_path))
    app = create_group_ops_app(group)
    client = await aiohttp_client(TestServer(app, host="127.0.0.1"))
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    response = await client.get(OPENAPI_PATH, headers=headers)
    assert response.status == 200
    document = await response.json()
    registered = registered_admin_routes(app)
    assert ("get", "/admin/workers") in registered
    # Its own routes, and those its catch-all forwards to a worker (config, reload, ...).
    served = registered | documented_routes(admin_openapi())
    assert documented_routes(document) == served
    assert (await client.get(OPENAPI_PATH)).status == 401
