"""Every error the API returns is JSON: {"error": {"code", "message", ...}}. Never a traceback."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from core.data.errors import MAX_SHOWN, DataError, clip
from worker.service.jobstore import StoreError
from worker.service.quotas import QuotaExceeded

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, http_status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = http_status
        self.code = code
        self.message = message
        self.headers = headers
        self.extra = extra


class FieldProblem(BaseModel):
    field: str = Field(description="the request field, dotted (params.surrogate.epochs), or body")
    message: str


class ErrorDetail(BaseModel):
    """What went wrong: a stable `code` to branch on, a message for people, and, depending on the code,
    fields that say where (more may come: clients should ignore those they do not know)."""

    model_config = ConfigDict(extra="allow")

    code: str = Field(examples=["not_found"], description="stable: not_found, invalid_request, invalid_dataset, "
                      "unauthorized, dataset_not_ready, job_finished, upload_too_large, store_unavailable, ...")
    message: str = Field(description="one sentence; values quoted from the request are cut to 200 characters")
    field: str | None = Field(None, description="the request field at fault (422, some 400s)")
    details: list[FieldProblem] | None = Field(None, description="422: each field at fault, one entry per field")
    file: str | None = Field(None, description="the uploaded file at fault, by its name in the upload")
    line: int | None = Field(None, description="its line (1-based), where one is at fault")
    limit: int | float | None = Field(None, description="the limit passed (bytes, seconds, files, a ratio)")
    status: str | None = Field(None, description="the job's status, where it forbids what was asked")


class ErrorBody(BaseModel):
    """The body of every error answer (4xx and 5xx): the schema of each error code in /openapi.json."""

    error: ErrorDetail


# Most entries of an error's `details` list: one per field, a request has a few dozen fields at most.
MAX_DETAILS = 20


def error_body(code: str, message: str, **extra: Any) -> dict:
    """An error's JSON body. Every text in it is clipped (core.data.errors.clip): no input echoed in an
    error can make the body large."""
    extra = {k: clip(v) if isinstance(v, str) else v for k, v in extra.items() if v is not None}
    return {"error": {"code": code, "message": clip(message), **extra}}


def not_found(kind: str, ident: str) -> ApiError:
    # The same answer for "does not exist" and "belongs to another tenant": nothing leaks.
    return ApiError(404, "not_found", f"{kind} {ident} not found")


def invalid_dataset(exc: DataError, root: Path) -> ApiError:
    """A 400 for a dataset's structural problem found at upload (`core.data.precheck`): the file as
    the client knows it (its name in the flat upload folder `root`, never a server path), line,
    field, and a message naming them. Same code and fields as a worker's `invalid` dataset errors."""
    info = exc.for_client(root)
    file, reason = info["file"], info["message"]
    where = [x for x in (file, f"line {exc.line}" if exc.line else None,
                         f"field '{exc.field}'" if exc.field else None) if x]
    message = f"{', '.join(where)}: {reason}" if where else reason
    return ApiError(400, "invalid_dataset", message, file=file, line=exc.line, field=exc.field)


def too_many_files(what: str, limit: int, setting: str) -> ApiError:
    """413 for an upload or an archive with more files than `setting` allows."""
    return ApiError(413, "too_many_files", f"{what} holds more than {limit} files ({setting})", limit=limit,
                    setting=setting)


_STORE_STATUS = {"not_found": 404, "dataset_not_ready": 409, "invalid_transition": 409, "idempotency_conflict": 409}


# Pydantic names the member of a union that failed (budget.int, budget.float): the client sent `budget`.
_UNION_TAGS = {"int", "float", "str", "bool", "none"}


def _field(loc: tuple | list) -> str:
    parts = [str(x) for x in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    while len(parts) > 1 and parts[-1] in _UNION_TAGS:
        parts.pop()
    return ".".join(parts) or "body"


# The methods a route may have; a 405's `Allow` lists those that some route at the path answers.
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method that some route at this path answers. Starlette's 405 named only the methods of the
    first route whose path matched (POST for /v1/datasets, whose GET is another route), so its `Allow`
    left methods out. Asked through each route's public `matches` with the method changed, since
    FastAPI keeps an included router's routes behind one route of its own."""
    allowed = []
    for method in _METHODS:
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, **exc.extra), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StoreError)
    async def _store_error(_: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, str(exc), **exc.extra), status_code=_STORE_STATUS.get(exc.code, 409))

    @app.exception_handler(QuotaExceeded)
    async def _quota(_: Request, exc: QuotaExceeded) -> JSONResponse:
        # A tenant at one of its limits (jobs, datasets, stored bytes): 429, the limit named in the body.
        return JSONResponse(error_body("quota_exceeded", exc.message, **exc.details()), status_code=429,
                            headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        details = []
        for e in errors:
            item = {"field": clip(_field(e.get("loc", ())), MAX_SHOWN), "message": clip(str(e.get("msg", "invalid")))}
            if not any(d["field"] == item["field"] for d in details):  # one line per field
                details.append(item)
            if len(details) == MAX_DETAILS:
                break
        first = details[0] if details else {"field": "body", "message": "invalid request"}
        return JSONResponse(error_body("invalid_request", f"{first['field']}: {first['message']}",
                                       field=first["field"], details=details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            allowed = _allowed_methods(request) or (exc.headers or {}).get("Allow", "")
            return JSONResponse(error_body("method_not_allowed", f"{request.method[:20]} is not allowed here; "
                                           f"allowed: {allowed}"), status_code=405, headers={"Allow": allowed})
        code = {404: "not_found"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("job store unavailable: %s", exc)
        return JSONResponse(error_body("store_unavailable", "the job store (Redis) is unavailable; retry shortly"),
                            status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(OperationalError)
    async def _broker_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("broker unavailable: %s", exc)
        return JSONResponse(error_body("broker_unavailable", "the task queue is unavailable; retry shortly"),
                            status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "internal error"), status_code=500)
