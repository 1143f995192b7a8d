"""The supervisor's ops listener for `serve --workers N`: one view of the whole group.

`/metrics` scrapes every worker's private ops socket and returns one exposition in
which every sample carries a `worker` label; admin calls that change state go to
every worker, reads are merged (audit, cache stats) or answered by the first
worker that can. Worker processes themselves are run by `gateway.runtime.workers`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.http.answers import json_error
from gateway.http.answers import json_response as _json
from gateway.runtime.slots import WORKER_LABEL, Reply
from gateway.runtime.workers import WorkerGroup

log = logging.getLogger("tower_gateway.workers")

# Snapshot fields that describe one worker's settings rather than count events.
_NOT_SUMMED: Final = frozenset({"cache_hit_ratio", "max_entries"})
GROUP: Final = web.AppKey("worker_group", WorkerGroup)

# --------------------------------------------------------------------------- metrics


def merge_expositions(pages: Iterable[tuple[str, str]]) -> tuple[list[Metric], list[str]]:
    """Merge Prometheus text pages into one family list, labelling every sample.

    `pages` holds (worker label, exposition text). A family keeps the HELP and
    TYPE of the first page that has it, so each is written once; a page whose
    type disagrees for a family is skipped for that family (the two cannot be
    one family). Returns the families and the labels of unparsable pages.
    """
    families: dict[str, Metric] = {}
    unparsable: list[str] = []
    for worker, text in pages:
        try:
            parsed = list(text_string_to_metric_families(text))
        except (ValueError, IndexError):
            unparsable.append(worker)
            continue
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            elif merged.type != family.type:
                log.warning(
                    "metric %s has type %s in worker %s, %s elsewhere; skipped",
                    family.name,
                    family.type,
                    worker,
                    merged.type,
                )
                continue
            for sample in family.samples:
                merged.samples.append(
                    sample._replace(labels={**sample.labels, WORKER_LABEL: worker})
                )
    return list(families.values()), unparsable


class _Families(Collector):
    """A fixed list of families, so `generate_latest` can write them."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge_cache_stats(snapshots: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum the workers' `/admin/cache` counters and recompute the hit ratio from the sums."""
    total: dict[str, Any] = {}
    for snapshot in snapshots:
        for name, value in snapshot.items():
            if name in _NOT_SUMMED or isinstance(value, bool) or not isinstance(value, int):
                continue
            total[name] = total.get(name, 0) + value
    hits, misses = total.get("hits", 0), total.get("misses", 0)
    total["cache_hit_ratio"] = round(hits / (hits + misses), 6) if hits + misses else 0.0
    return total


# --------------------------------------------------------------------------- the parent's ops app




def _passthrough(reply: Reply) -> web.Response:
    return web.Response(body=reply.body, status=reply.status, content_type="application/json")


def _unavailable(failed: Sequence[Reply]) -> web.Response:
    names = ", ".join(f"{r.worker} ({r.error or f'status {r.status}'})" for r in failed)
    return json_error(502, "worker_unavailable", f"workers did not answer: {names}")


def _no_worker() -> web.Response:
    return json_error(503, "unavailable", "no worker answered")


# Never passed to a worker: hop-by-hop headers, the body framing (set again for
# the worker), the caller's credentials (the parent sends its own) and any
# client-sent X-Forwarded-For (the parent sets it).
_NOT_FORWARDED: Final = frozenset(
    name.lower()
    for name in (
        hdrs.HOST,
        hdrs.AUTHORIZATION,
        hdrs.PROXY_AUTHORIZATION,
        hdrs.CONTENT_LENGTH,
        hdrs.TRANSFER_ENCODING,
        hdrs.CONNECTION,
        hdrs.KEEP_ALIVE,
        hdrs.UPGRADE,
        hdrs.TE,
        hdrs.TRAILER,
        hdrs.EXPECT,
        hdrs.X_FORWARDED_FOR,
    )
)


def _forwarded_headers(request: web.Request) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
    # On its unix socket a worker has no peer address: this names the real
    # caller in its audit trail.
    if request.remote:
        headers[hdrs.X_FORWARDED_FOR] = request.remote
    return headers


def create_group_ops_app(group: WorkerGroup) -> web.Application:
    """The parent's ops listener: the same endpoints as one process, answered for the group.

    Cache and revocation endpoints are merged explicitly; a key is created or changed
    by one worker, and a change then drops the key's cache in every worker; the key
    page is served here. Any other `/admin/*`
    request is forwarded: a GET (and `POST /admin/explain`, which may need the
    one worker that cached a fingerprint) to ready workers in turn until one has
    an answer other than 404; any other method to every running worker, the
    answer being the first refusal or else the first reply, with each worker's
    reply listed under "workers".
    """
    from gateway.http.server import listener_app
    from gateway.ops.admin_ui import add_ui_routes
    from gateway.ops.audit import parse_limit
    from gateway.ops.keys_api import no_store
    from gateway.ops.listener import admin_guard
    from gateway.ops.openapi import OPENAPI_PATH, admin_openapi

    app = listener_app(web.Application(middlewares=[no_store]), group.config.server)
    app[GROUP] = group
    admin = admin_guard(group.config.admin.token)

    async def metrics(_request: web.Request) -> web.Response:
        replies = await group.fan_out(hdrs.METH_GET, "/metrics", every=False)
        pages, up = [], {}
        for reply in replies:
            up[reply.worker] = reply.status == 200
            if reply.status == 200:
                pages.append((str(reply.worker), reply.body.decode("utf-8", "replace")))
        families, unparsable = merge_expositions(pages)
        for worker in unparsable:
            log.warning("worker %s returned unparsable metrics", worker)
            up[int(worker)] = False
        families.extend(group.own_metrics(up))
        body = generate_latest(_Families(families))
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        ready = sum(1 for s in group.slots if s.ready.is_set())
        return _json({"status": "ok", "workers": len(group.slots), "workers_ready": ready})

    async def readyz(_request: web.Request) -> web.Response:
        if group.stopping:
            return _json({"ready": False, "checks": {"stopping": True}}, 503)
        replies = await group.fan_out(hdrs.METH_GET, "/readyz", every=False)
        workers = []
        for reply in replies:
            entry: dict[str, Any] = {"worker": reply.worker, "ready": reply.status == 200}
            with contextlib.suppress(ValueError, AttributeError):
                entry["checks"] = reply.json().get("checks")
            workers.append(entry)
        ready = any(w["ready"] for w in workers)
        return _json({"ready": ready, "workers": workers}, 200 if ready else 503)

    async def first_answer(request: web.Request) -> web.Response:
        # Every worker runs the same config and signing key: for a read, any
        # worker's answer is the group's, unless it has nothing (404).
        body = await request.read()
        headers = _forwarded_headers(request)
        answer: Reply | None = None
        for slot in group.slots:
            if not slot.ready.is_set():
                continue
            try:
                status, data = await group.call(
                    slot, request.method, request.raw_path, body=body or None, headers=headers
                )
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue
            answer = Reply(slot.index, status, data)
            if status != 404:
                break
        return _no_worker() if answer is None else _passthrough(answer)

    async def every_worker(request: web.Request) -> web.Response:
        body = await request.read()
        replies = await group.fan_out(
            request.method,
            request.raw_path,
            every=True,
            body=body or None,
            headers=_forwarded_headers(request),
        )
        if not replies:
            return _no_worker()
        failed = [r for r in replies if r.status == 0 or r.status >= 500]
        if failed:
            return _unavailable(failed)
        # The same input reached every worker: one refusal answers for all.
        lead = next((r for r in replies if not 200 <= r.status < 300), replies[0])
        try:
            answers = [r.json() for r in replies]
        except ValueError:
            return _passthrough(lead)
        if not all(isinstance(a, dict) for a in answers):
            return _passthrough(lead)
        merged = dict(answers[replies.index(lead)])
        merged["workers"] = [
            {"worker": r.worker, "status": r.status, **a}
            for r, a in zip(replies, answers, strict=True)
        ]
        return _json(merged, lead.status)

    async def cache_stats(_request: web.Request) -> web.Response:
        replies = await group.fan_out(hdrs.METH_GET, "/admin/cache", every=True)
        failed = [r for r in replies if r.status != 200]
        if failed:
            return _unavailable(failed)
        snapshots = [r.json() for r in replies]
        merged = merge_cache_stats(snapshots)
        merged["workers"] = [
            {"worker": r.worker, **s} for r, s in zip(replies, snapshots, strict=True)
        ]
        return _json(merged)

    async def cache_clear(request: web.Request) -> web.Response:
        replies = await group.fan_out(
            hdrs.METH_DELETE, "/admin/cache", every=True, headers=_forwarded_headers(request)
        )
        failed = [r for r in replies if r.status != 200]
        if failed:
            return _unavailable(failed)
        return _json({"cleared": True, "workers": len(replies)})

    async def cache_drop(request: web.Request) -> web.Response:
        key_id = request.match_info["key_id"]
        path = "/admin/cache/" + quote(key_id, safe="")
        replies = await group.fan_out(
            hdrs.METH_DELETE, path, every=True, headers=_forwarded_headers(request)
        )
        failed = [r for r in replies if r.status != 200]
        if failed:
            return _unavailable(failed)
        dropped = sum(int(r.json().get("dropped_entries", 0)) for r in replies)
        return _json({"key_id": key_id, "dropped_entries": dropped, "workers": len(replies)})

    async def revocations(request: web.Request) -> web.Response:
        # Each worker checks the tower's signature itself: the signed body and
        # its signature headers pass through untouched.
        body = await request.read()
        headers = _forwarded_headers(request)
        replies = await group.fan_out(
            hdrs.METH_POST, "/admin/revocations", every=True, body=body, headers=headers
        )
        if not replies:
            return _no_worker()
        failed = [r for r in replies if r.status == 0 or r.status >= 500]
        if failed:
            return _unavailable(failed)
        refused = next((r for r in replies if r.status != 200), None)
        if refused is not None:
            return _passthrough(refused)
        answers = [r.json() for r in replies]
        return _json(
            {
                "revoked": answers[0].get("revoked", 0),
                "dropped_entries": sum(int(a.get("dropped_entries", 0)) for a in answers),
                "workers": len(replies),
            }
        )

    async def audit(request: web.Request) -> web.Response:
        try:
            limit = parse_limit(request.query.get("limit"))
        except ValueError as exc:
            return json_error(400, "bad_request", str(exc))
        replies = await group.fan_out(
            hdrs.METH_GET, request.raw_path, every=False, headers=_forwarded_headers(request)
        )
        answered = [r for r in replies if r.status != 0]
        refused = next((r for r in answered if r.status != 200), None)
        if refused is not None:
            return _passthrough(refused)
        if not answered:
            return _no_worker()
        events: list[dict[str, Any]] = []
        for reply in answered:
            page = reply.json().get("events", [])
            events += [{**event, WORKER_LABEL: reply.worker} for event in page]
        # Each worker sent its newest `limit`; the newest `limit` of the group are among them.
        events.sort(key=lambda event: float(event.get("ts", 0)), reverse=True)
        return _json(
            {
                "events": events[:limit],
                "workers_missing": [r.worker for r in replies if r.status == 0],
            }
        )

    async def one_worker(request: web.Request) -> Reply | None:
        # A key is created, changed or revoked once, in the store every worker shares, by
        # the first ready worker (which audits it); never retried on another, which could
        # create a second key.
        slot = next((s for s in group.slots if s.ready.is_set()), None)
        if slot is None:
            return None
        body = await request.read()
        headers = _forwarded_headers(request)
        try:
            status, data = await group.call(
                slot, request.method, request.raw_path, body=body or None, headers=headers
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Reply(slot.index, 0, error=type(exc).__name__)
        return Reply(slot.index, status, data)

    async def key_create(request: web.Request) -> web.Response:
        reply = await one_worker(request)
        if reply is None:
            return _no_worker()
        return _unavailable([reply]) if reply.status == 0 else _passthrough(reply)

    async def key_change(request: web.Request) -> web.Response:
        """Revoke, rotate or update in one worker, then drop the key's cached identities in
        every worker, as `DELETE /admin/cache/{key_id}` does."""
        reply = await one_worker(request)
        if reply is None:
            return _no_worker()
        if reply.status == 0:
            return _unavailable([reply])
        if not 200 <= reply.status < 300:
            return _passthrough(reply)
        path = "/admin/cache/" + quote(request.match_info["key_id"], safe="")
        drops = await group.fan_out(
            hdrs.METH_DELETE, path, every=True, headers=_forwarded_headers(request)
        )
        answer = reply.json()
        done = [r for r in drops if r.status == 200]
        answer["dropped_entries"] = int(answer.get("dropped_entries", 0)) + sum(
            int(r.json().get("dropped_entries", 0)) for r in done
        )
        answer["workers"] = len(done)
        # The change is in the store already (and a rotated key was issued): report the
        # workers that did not confirm, rather than fail the call.
        answer["workers_missing"] = [r.worker for r in drops if r.status != 200]
        return _json(answer, reply.status)

    async def workers(_request: web.Request) -> web.Response:
        return _json({"pid": os.getpid(), "workers": [s.describe() for s in group.slots]})

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/.well-known/jwks.json", first_answer)
    app.router.add_get("/admin/cache", admin(cache_stats))
    app.router.add_delete("/admin/cache", admin(cache_clear))
    app.router.add_delete("/admin/cache/{key_id}", admin(cache_drop))
    app.router.add_post("/admin/revocations", admin(revocations))
    app.router.add_get("/admin/audit", admin(audit))
    app.router.add_get("/admin/workers", admin(workers))
    app.router.add_post("/admin/keys", admin(key_create))
    app.router.add_patch("/admin/keys/{key_id}", admin(key_change))
    app.router.add_post("/admin/keys/{key_id}/revoke", admin(key_change))
    app.router.add_post("/admin/keys/{key_id}/rotate", admin(key_change))
    token, local = group.config.admin.token, group.config.tower.local
    add_ui_routes(app, enabled=token is not None and local is not None)
    document = admin_openapi(workers=True)

    async def openapi(_request: web.Request) -> web.Response:
        return _json(document)

    app.router.add_get(OPENAPI_PATH, admin(openapi))
    app.router.add_post("/admin/explain", admin(first_answer))
    app.router.add_route(hdrs.METH_GET, "/admin/{tail:.*}", admin(first_answer))
    app.router.add_route(hdrs.METH_ANY, "/admin/{tail:.*}", admin(every_worker))
    return app
