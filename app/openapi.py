"""What /openapi.json says each route answers: the `responses=` of every route decorator, built here
once per kind of route, so that a status code a kind of route can answer is written down in one place.

Every error is the JSON body of `app.errors.ErrorBody`, with the headers that come with it
(`WWW-Authenticate` on 401, `Retry-After` on 429 and 503). The bearer schemes themselves come from
the dependencies that check them (`app.auth`): FastAPI puts a route's `security` beside it from its
dependencies, so the schema cannot claim a key where none is checked or miss one where it is.
tests/service/test_schemathesis.py checks the server against this schema (every status code and body
it answers is declared); tests/service/test_service_openapi.py checks what each kind declares."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Path

from app.auth import API_KEY_SCHEME, METRICS_ADMIN_TOKEN_SCHEME, METRICS_TOKEN_SCHEME
from app.errors import ErrorBody
from app.filenames import ARCHIVE_EXTENSIONS, DATA_EXTENSIONS
from core.data.tables import MAX_LINE_BYTES
from worker.service.jobstore import id_pattern
from worker.service.responses import JobOut
from worker.service.settings import Settings

Responses = dict[int | str, dict[str, Any]]

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                               "schema": {"type": "integer", "minimum": 0}}}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "`Bearer`: the scheme to authenticate with",
                                          "schema": {"type": "string"}}}
_LOCATION = {"Location": {"description": "the job's URL, /v1/jobs/{id}", "schema": {"type": "string"}}}


def error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """An error answer: the description of when it comes, the JSON error body, its headers."""
    return {"model": ErrorBody, "description": description, **({"headers": headers} if headers else {})}


# What every /v1 route can answer whatever it does: it needs a tenant's key (app.auth.require_tenant),
# FastAPI validates its parameters, and it reads the job store. (Where a path id is the only parameter
# nothing can fail, a malformed id being a 404 as an unknown one is; but FastAPI declares a 422 on every
# route with parameters, with a body the API never sends, unless the route declares its own.)
UNAUTHORIZED = error("no API key or an unknown one: send `Authorization: Bearer <key>`", _WWW_AUTHENTICATE)
UNAVAILABLE = error("the job store (Redis) or the task queue is unavailable; retry after `Retry-After` seconds",
                    RETRY_AFTER)
_EVERY_TENANT_ROUTE: Responses = {
    401: UNAUTHORIZED,
    422: error("a parameter or body field of the wrong type or out of its bounds: `error.field` names the first, "
               "`error.details` lists each"),
    503: UNAVAILABLE,
}
# The tenant's limits (jobs queued or running, stored bytes, datasets, files per upload): on every route
# that uploads a dataset or starts a job.
_QUOTA: Responses = {429: error("one of the tenant's limits is reached (jobs queued or running, stored bytes, "
                                "datasets); retry after `Retry-After` seconds", RETRY_AFTER)}


def tenant_route(own: Responses | None = None, *, quota: bool = False) -> Responses:
    """A /v1 route's answers: those of every tenant route, 429 where `quota`, and the route's `own`."""
    return {**_EVERY_TENANT_ROUTE, **(_QUOTA if quota else {}), **(own or {})}


_NO_DATASET = error("no such dataset (another tenant's gets the same answer)")
_NO_JOB = error("no such job (another tenant's gets the same answer)")
_UPLOAD_ERRORS: Responses = {
    400: error("a file that is not UTF-8 text, lacks a required column or whose layout is not recognised "
               "(`error.file`, `line`, `field`); an empty file; a file name that is empty or hidden; two files of "
               "one name; an unsafe or unreadable archive, or one beside other files; a malformed multipart body, "
               "a part other than `files`, or none"),
    408: error("the upload stalled for longer than the server keeps partial uploads (`error.limit` seconds)"),
    413: error("the upload, or an archive once unpacked, is over the server's size limit (`error.limit` bytes), or "
               "the upload or the archive holds too many files (`error.limit` files)"),
    415: error("the body is not multipart/form-data, or a file is of a refused type: NumPy or pickle (by name or "
               "content), or an extension no loader reads"),
}

# The multipart body of both upload routes (the routes stream it themselves: app/uploads.py): one or
# more `files` parts and nothing else (another field is a 400), each with a file name; at most the
# server's DEALREC_MAX_UPLOAD_FILES of them (a 413 past it): `state_limits` adds that maxItems, the
# app factory being the one that knows the server's settings.
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"], "additionalProperties": False,
    "properties": {"files": {
        "type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
        "description": "the dataset's files (DEALRec layout, interaction log + items table, RecBole atomic files) or "
                       "one .zip / .tar.gz holding them, each part with its file name: "
                       f"{', '.join(DATA_EXTENSIONS + ARCHIVE_EXTENSIONS)} (NumPy and pickle files are refused); "
                       f"text in UTF-8 (Parquet aside), no line over {MAX_LINE_BYTES >> 20} MiB; at most "
                       "DEALREC_MAX_UPLOAD_FILES parts, the whole upload within the server's "
                       "DEALREC_MAX_UPLOAD_BYTES"}}}}}}}


def state_limits(app: FastAPI, settings: Settings) -> None:
    """The app's schema states this server's limits: the upload routes' `files` get `maxItems` =
    DEALREC_MAX_UPLOAD_FILES; with DEALREC_AUTH_DISABLED=1 no route asks for an API key (the scheme,
    the routes' requirement of it and their 401 are gone: such a server never answers one).
    Written into the schema each app generates (FastAPI's documented way
    to extend it), not into the routes' `openapi_extra`: the routers are module-level, shared by every
    app of the process, and FastAPI's generated schema is a fresh copy (jsonable_encoder), so two
    apps with other settings never see each other's value."""
    generate = app.openapi

    def openapi_with_limits() -> dict[str, Any]:
        schema = generate()  # cached by FastAPI; setting the value again is idempotent
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                content = op.get("requestBody", {}).get("content", {}) if isinstance(op, dict) else {}
                files = content.get("multipart/form-data", {}).get("schema", {}).get("properties", {}).get("files")
                if files is not None:
                    files["maxItems"] = settings.max_upload_files
        if settings.auth_disabled:
            _without_api_key(schema)
        return schema

    app.openapi = openapi_with_limits  # type: ignore[method-assign]


def _without_api_key(schema: dict[str, Any]) -> None:
    """Drop the tenant key from a schema (in place; idempotent): the scheme, each route's requirement
    of it, and the 401 of the routes that required nothing else."""
    name = API_KEY_SCHEME.scheme_name
    schema.get("components", {}).get("securitySchemes", {}).pop(name, None)
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            if not isinstance(op, dict) or "security" not in op:
                continue
            kept = [req for req in op["security"] if name not in req]
            if len(kept) == len(op["security"]):
                continue
            if any(req for req in kept):  # another credential is still checked (its 401 stays)
                op["security"] = kept
            else:  # nothing left to check: anyone gets in
                del op["security"]
                op.get("responses", {}).pop("401", None)


UPLOAD = tenant_route(_UPLOAD_ERRORS, quota=True)
NEW_VERSION = tenant_route({
    **_UPLOAD_ERRORS,
    400: error(f"{_UPLOAD_ERRORS[400]['description']}; an addition that cannot be appended to the dataset's files"),
    404: _NO_DATASET,
    409: error("the dataset is not ready"),
}, quota=True)
LIST = tenant_route()
DATASET = tenant_route({404: _NO_DATASET})
DELETE_DATASET = tenant_route({404: _NO_DATASET, 409: error("a queued or running job uses the dataset")})
NEW_JOB = tenant_route({
    200: {"model": JobOut, "headers": {**_LOCATION, "Idempotent-Replayed": {"description": "true",
                                                                            "schema": {"type": "string"}}},
          "description": "an earlier job of the same tenant with the same Idempotency-Key and request"},
    202: {"headers": _LOCATION},
    404: _NO_DATASET,
    409: error("the dataset is not ready (`error.dataset_status`), or the Idempotency-Key was used with another "
               "request"),
    422: error("a body field of the wrong type or out of its bounds (`error.field`, `error.details`), a rule across "
               "fields (a budget the dataset cannot give, ...), or an LLM this server does not offer "
               "(`params.effort.llm`; a server without one refuses every method that needs one, and fine-tuning)"),
}, quota=True)
JOB = tenant_route({404: _NO_JOB})
CANCEL = tenant_route({404: _NO_JOB, 409: error("the job has already finished (`error.status`)")})


def download(media_types: dict[str, dict[str, Any]], *, missing: str = "no such job, or the file is no longer "
             "stored") -> Responses:
    """A job's result file: 200 in these media types (each with its schema), 404 when `missing`, 409 while
    the job has not succeeded."""
    return tenant_route({
        200: {"content": {media: {"schema": schema} for media, schema in media_types.items()}},
        404: error(missing),
        409: error("the job has not succeeded (`error.status`): its results exist once it has"),
    })


TEXT = {"type": "string"}
JSON_OBJECT = {"type": "object"}
BINARY = {"type": "string", "format": "binary"}

# /readyz answers anyone; a tenant's key or a metrics token adds the workers' identities.
OPTIONAL_CREDENTIALS = {"security": [{}, {API_KEY_SCHEME.scheme_name: []}, {METRICS_TOKEN_SCHEME.scheme_name: []},
                                     {METRICS_ADMIN_TOKEN_SCHEME.scheme_name: []}]}
READY: Responses = {503: error("Redis is unreachable or no live worker consumes the cpu queue (`error.checks` "
                               "says which)")}


def beside_text(responses: Responses) -> Responses:
    """The errors of a route whose own answer is not JSON (`response_class=PlainTextResponse`): FastAPI
    would declare each `model` in the route's media type, but errors are JSON. Referenced by name: the
    JSON routes put ErrorBody in components.schemas."""
    ref = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}}}
    return {code: {**{k: v for k, v in r.items() if k != "model"}, "content": ref} if r.get("model") is ErrorBody
            else r for code, r in responses.items()}


METRICS = beside_text({
    401: error("no metrics token or another one (a tenant's API key does not open /metrics)", _WWW_AUTHENTICATE),
    404: error("metrics are off: neither DEALREC_METRICS_TOKEN nor DEALREC_METRICS_ADMIN_TOKEN is set"),
})

# Path ids: their exact shape (worker.service.jobstore.id_pattern). One of another shape is answered
# 404, as an unknown id is, so the pattern is stated for clients, not checked by FastAPI (which
# would answer 422).
DatasetId = Annotated[str, Path(description="a dataset's id", json_schema_extra={"pattern": id_pattern("ds")})]
JobId = Annotated[str, Path(description="a job's id", json_schema_extra={"pattern": id_pattern("job")})]
