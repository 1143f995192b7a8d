"""The operator's admin endpoints beyond the cache: audit, effective config, explain, reload.

All are mounted on the ops listener behind the admin guard (`gateway.ops.listener`):

    GET  /admin/audit?limit=N   recent audit events, newest first (1 <= N <= 1000)
    GET  /admin/config          the config in effect, every secret redacted
    POST /admin/explain         {"key" | "fingerprint", "method", "path"} -> the decision and why
    POST /admin/reload          re-read the config file (as SIGHUP does)

Keys travel only in a POST body, never in a URL, and are never logged or echoed.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web

from gateway.config import Config
from gateway.decision.explain import decision_mode
from gateway.http.answers import json_error as _error
from gateway.http.answers import json_response as _json
from gateway.ops.audit import parse_limit
from gateway.ops.explain import ExplainQuery, UnknownFingerprint
from gateway.replicas.webhook import revocation_webhook

if TYPE_CHECKING:
    from gateway.ops.parts import OpsParts

REDACTED: Final = "<redacted>"
# Secrets by their dotted key; anything whose name looks like a secret is redacted too,
# so a secret added to the schema later is hidden before anyone remembers this list.
SECRET_KEYS: Final = frozenset(
    {
        "tower.api_key",
        "tower.secret",
        "tower.local.hash_secret",
        "jwt.secret",
        "admin.token",
        "admin.webhook_secret",
        "cache.fingerprint_secret",
        "cache.previous_fingerprint_secrets",
    }
)
_SECRET_NAME: Final = re.compile(r"secret|token|password|api_key|credential", re.IGNORECASE)
_URL_KEYS: Final = frozenset({"redis.url"})
MAX_EXPLAIN_BODY: Final = 16 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_client(request: web.BaseRequest) -> str | None:
    """Who called an admin endpoint. A worker's private ops socket (`--workers`) is a unix
    socket only the supervisor can open: there the supervisor names the real caller."""
    if request.remote:  # empty (or None) on a unix socket
        return request.remote
    return request.headers.get("X-Forwarded-For")


# --------------------------------------------------------------------------- config


def redact_url(url: str) -> str:
    """A URL without its password (userinfo or a `password=` query parameter)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = netloc.rpartition("@")[2]
        netloc = f"{user}:{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, REDACTED if _SECRET_NAME.search(k) else v) for k, v in pairs], safe="<>"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _plain(value: Any, path: str) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
            for f in fields(value)
            if not f.metadata.get("internal")
        }
    if isinstance(value, Mapping):
        # Mapping keys here are roles and scopes, never secrets: only values are walked.
        return {str(k): _plain(v, path) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if value is None:
        return None
    name = path.rsplit(".", 1)[-1]
    if path in SECRET_KEYS or (isinstance(value, str) and _SECRET_NAME.search(name)):
        return REDACTED
    if path in _URL_KEYS and isinstance(value, str):
        return redact_url(value)
    return value


def config_json(config: Config) -> dict[str, Any]:
    """The config as JSON data with every secret replaced by `<redacted>` (unset stays null)."""
    data: dict[str, Any] = _plain(config, "")
    return data


# --------------------------------------------------------------------------- routes


def add_admin_routes(
    app: web.Application, parts: OpsParts, admin: Callable[[Handler], Handler]
) -> None:
    async def audit(request: web.Request) -> web.Response:
        try:
            limit = parse_limit(request.query.get("limit"))
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        return _json({"events": parts.audit().recent(limit)})

    async def config(_request: web.Request) -> web.Response:
        last = parts.reloader.last
        running = parts.config()
        return _json(
            {
                "source": parts.reloader.path or running.source,
                "config": config_json(running),
                "last_reload": last.as_json() if last is not None else None,
            }
        )

    async def explain_handler(request: web.Request) -> web.Response:
        body = await request.content.read(MAX_EXPLAIN_BODY + 1)
        if len(body) > MAX_EXPLAIN_BODY:
            return _error(413, "body_too_large", f"at most {MAX_EXPLAIN_BODY} bytes")
        try:
            decoded = json.loads(body)
        except (ValueError, RecursionError):
            # A fixed text: a decoder's message may quote the input, which may hold the key.
            return _error(400, "bad_request", "the body is not JSON")
        try:
            query = ExplainQuery.parse(decoded)
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        client = admin_client(request)
        try:
            answer = await parts.explainer.explain(query)
            decision_mode(parts.config(), time.time(), answer)
        except UnknownFingerprint:
            parts.audit().admin(
                "explain", client=client, ok=False, key=query.fingerprint, reason="unknown"
            )
            return _error(
                404,
                "unknown_fingerprint",
                "no identity with this fingerprint is cached here; explain by key instead",
            )
        parts.audit().admin(
            "explain",
            client=client,
            key=answer["key"],
            method=query.method,
            path=query.path.partition("?")[0],  # as the access log: never a query string
            route=answer["route"]["name"] if answer["route"] else None,
            decision=answer["decision"],
            reason=answer["reason"],
        )
        return _json(answer)

    async def reload_handler(request: web.Request) -> web.Response:
        result = parts.reloader.reload(trigger="api", client=admin_client(request))
        return _json(result.as_json(), 200 if result.ok else 422)

    app.router.add_get("/admin/audit", admin(audit))
    app.router.add_get("/admin/config", admin(config))
    app.router.add_post("/admin/explain", admin(explain_handler))
    app.router.add_post("/admin/reload", admin(reload_handler))


def audited_webhook(parts: OpsParts) -> Handler:
    """`POST /admin/revocations` (`gateway.replicas.shared`), with an audit event per call."""
    secret = parts.admin.webhook_secret

    async def handler(request: web.Request) -> web.StreamResponse:
        revoked: list[str] = []

        async def revoke(key_ids: Sequence[str]) -> int:
            revoked.extend(key_ids)
            dropped: int = await parts.revoker.revoke_key_ids(key_ids)
            return dropped

        response = await revocation_webhook(secret, revoke)(request)
        parts.audit().admin(
            "revocation_webhook",
            client=admin_client(request),
            ok=response.status == 200,
            status=response.status,
            key_ids=revoked,
            revoked=len(revoked),
        )
        return response

    return handler
