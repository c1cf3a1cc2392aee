"""The FastAPI application. Run with `dealrec serve` (or `uvicorn --factory app.main:create_app`).

`create_app` refuses to build without API keys unless `DEALREC_AUTH_DISABLED=1`: a service that
silently accepts anyone is worse than one that does not start."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from app import errors, openapi
from app.auth import Authenticator, load_keys
from app.context import ServiceContext
from app.routes import console, datasets, docs, jobs, ops
from worker.service.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """DEALRec data pruning over HTTP: upload a dataset, start a pruning job, poll it,
download the selected sample ids. Authenticate with `Authorization: Bearer <key>`. A web console is at `/`.
Every error is JSON: `{"error": {"code": "...", "message": "..."}}`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    keys = load_keys(settings)  # raises ConfigError: no keys and auth not disabled
    if settings.auth_disabled:
        log.warning("authentication is DISABLED (DEALREC_AUTH_DISABLED=1): every request is tenant 'default'")
    # /docs and /redoc from packaged assets (app/routes/docs.py), not FastAPI's CDN-loading pages.
    app = FastAPI(title="dealrec", version="1", description=DESCRIPTION, docs_url=None, redoc_url=None)
    app.state.ctx = ServiceContext.build(settings)
    app.state.auth = Authenticator(keys, disabled=settings.auth_disabled, metrics_token=settings.metrics_token,
                                   metrics_admin_token=settings.metrics_admin_token)
    errors.install(app)
    app.include_router(datasets.router, prefix="/v1")
    app.include_router(jobs.router, prefix="/v1")
    app.include_router(ops.router)
    app.include_router(console.router)  # the web console at /
    openapi.state_limits(app, settings)  # the schema states this server's limits (files per upload)
    folder = docs.assets_dir()
    if folder is not None:
        app.include_router(docs.router(folder, app.openapi_url or "/openapi.json", app.title))
    else:
        log.warning("/docs and /redoc are off: the package fastapi-offline (their assets) is not installed; "
                    "the schema is at /openapi.json")
    return app
