"""`GET /admin/ui`: the key-management page, three static files served by the gateway itself.

The page and its assets are the only `/admin` paths answered without the admin
bearer: a browser cannot send that header when it navigates, and the files hold
no data and no secret (the same bytes for everyone). The page asks for the
token, keeps it in the tab's `sessionStorage`, and sends it with every API call
it makes; nothing is read or changed without it. Both are 404 unless an admin
token and the embedded tower (`tower.local`) are configured.

Every answer carries a Content-Security-Policy that allows only this origin's
own script, style and API (no inline script or style, no form submission, no
framing), `no-store`, `nosniff` and `Referrer-Policy: no-referrer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from aiohttp import hdrs, web

UI_PATH: Final = "/admin/ui"
# name -> content type; the only files served, read once.
ASSETS: Final = {
    "app.js": "text/javascript",
    "app.css": "text/css",
    "icon.svg": "image/svg+xml",
}
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS: Final = {
    "Content-Security-Policy": CSP,
    hdrs.CACHE_CONTROL: "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


# Read when the module is imported: a process that drops privileges after loading the
# package (as the container image's user does) can still serve them.
_HERE: Final = Path(__file__).resolve().parent
_PAGE: Final = (_HERE / "index.html").read_bytes()
_ASSETS: Final = {name: ((_HERE / name).read_bytes(), kind) for name, kind in ASSETS.items()}


def add_ui_routes(app: web.Application, *, enabled: bool) -> None:
    """`GET /admin/ui` and `GET /admin/ui/{asset}`; 404 when not `enabled`."""
    page, assets = _PAGE, _ASSETS

    def answer(body: bytes, kind: str) -> web.Response:
        return web.Response(body=body, content_type=kind, charset="utf-8", headers=HEADERS)

    def missing() -> web.Response:
        return web.json_response(
            {"error": "not_found", "detail": "the key page needs an admin token and tower.local"},
            status=404,
            headers={hdrs.CACHE_CONTROL: "no-store"},
        )

    async def index(_request: web.Request) -> web.Response:
        return answer(page, "text/html") if enabled else missing()

    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["asset"])
        if not enabled or found is None:
            return missing()
        return answer(*found)

    app.router.add_get(UI_PATH, index)
    app.router.add_get(UI_PATH + "/{asset}", asset)
