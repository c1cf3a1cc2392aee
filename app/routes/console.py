"""The web console: static files shipped in the package (`app/console/`), served at `/` and
`/console/<file>`. Plain HTML, CSS and JavaScript, no build step and nothing fetched from elsewhere:
the page calls the /v1 API itself with the key the user typed (kept in the tab's session storage).
The JavaScript is native ES modules: index.html loads app.js with <script type="module">, and each
module imports its siblings by relative path (./api.js is /console/api.js), so the folder stays flat.
A browser runs a module only when it comes with a JavaScript media type: hence text/javascript.

Served without authentication (the files hold no tenant's data) and with a strict Content Security
Policy: scripts (the imported modules too), styles and connections from this origin only, no inline
script. `no-cache` makes the browser revalidate every file on each load, so a page never runs a new
module next to a stale cached one."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import ApiError

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
_MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    # Only a plain file of the folder, by name: never a path built from the request.
    files = {p.name: p for p in CONSOLE_DIR.iterdir() if p.is_file() and p.suffix in _MEDIA}
    path = files.get(name)
    if path is None:
        raise ApiError(404, "not_found", f"console file {name[:80]} not found")
    return FileResponse(path, media_type=_MEDIA[path.suffix], headers=HEADERS)


@router.get("/")
def console_index() -> FileResponse:
    return _file("index.html")


@router.get("/console/{name}")
def console_asset(name: str) -> FileResponse:
    return _file(name)
