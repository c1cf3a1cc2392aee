"""The API's documentation pages, /docs (Swagger UI) and /redoc (ReDoc), with every asset served from
this process: FastAPI's own pages load Swagger UI and ReDoc from a CDN, which a deployment without
internet cannot reach. The assets are the package `fastapi-offline`'s copies of those FastAPI uses
(the service extra installs it; we use its files, not its app factory). Where it is not installed
the pages are not served (404) and /openapi.json is the schema.

The pages carry a Content Security Policy that allows this origin only, so a browser refuses any
asset from elsewhere; Swagger UI's one inline script (FastAPI's bootstrap) is allowed by its hash, not
by 'unsafe-inline'. Swagger UI's online validator badge is off (validatorUrl null). The one thing left
that asks another server is ReDoc's "powered by" logo (cdn.redoc.ly, hard-wired in its bundle): the
policy blocks that request before it leaves the browser, and ReDoc hides the image."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import logging
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from app.errors import ApiError

log = logging.getLogger(__name__)

ASSETS_URL = "/docs/assets"
# The files a page needs, by name; nothing else of the package's folder is served.
ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
          "redoc.standalone.js": "text/javascript; charset=utf-8", "favicon.png": "image/png"}
# ReDoc styles itself with injected <style> elements and runs its search in a blob: worker.
CSP = ("default-src 'none'; script-src {scripts}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; "
       "form-action 'none'")
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def assets_dir() -> Path | None:
    """fastapi-offline's static folder when it is installed and holds every asset, else None."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "static"
    return folder if all((folder / name).is_file() for name in ASSETS) else None


def _page(response: HTMLResponse) -> HTMLResponse:
    """The page with its CSP: the hash of each inline script, as the browser computes it."""
    html = response.body.decode()
    scripts = ["'self'", *(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                           for s in _INLINE_SCRIPT.findall(html))]
    return HTMLResponse(html, headers={"Content-Security-Policy": CSP.format(scripts=" ".join(scripts)),
                                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


def router(folder: Path, openapi_url: str, title: str) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.get("/docs")
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _page(get_swagger_ui_html(
            openapi_url=root + openapi_url, title=f"{title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css", swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None}))

    @r.get("/redoc")
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _page(get_redoc_html(
            openapi_url=root + openapi_url, title=f"{title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js", redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False))

    @r.get(ASSETS_URL + "/{name}")
    def asset(name: str) -> FileResponse:
        if name not in ASSETS:  # a name from the list, never a path built from the request
            raise ApiError(404, "not_found", f"documentation asset {name[:80]} not found")
        return FileResponse(folder / name, media_type=ASSETS[name],
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    return r
