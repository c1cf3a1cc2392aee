"""/v1/prune and /v1/jobs: start a job, read it, its events, cancel it, download its results."""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from app import openapi
from app.auth import require_tenant
from app.context import ServiceContext, checked_id, get_ctx
from app.errors import ApiError, not_found
from worker.service.dispatch import release_held
from worker.service.jobs import JobRequestError, create_prune_job
from worker.service.jobstore import MAX_EVENT_ID, StoreError
from worker.service.records import TERMINAL, JobRecord
from worker.service.requests import PruneRequest
from worker.service.responses import EventList, JobList, JobOut

log = logging.getLogger(__name__)
router = APIRouter(tags=["jobs"])

JobStatusFilter = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def _job(ctx: ServiceContext, job_id: str, tenant: str) -> JobRecord:
    checked_id("job", job_id, "job")
    job = ctx.store.get_job(job_id, tenant)
    if job is None:
        raise not_found("job", job_id)
    return job


@router.post("/prune", status_code=202, response_model=JobOut, responses=openapi.NEW_JOB)
def start_prune(req: PruneRequest, request: Request, tenant: str = Depends(require_tenant),
                idempotency_key: str | None = Header(None, max_length=200)) -> Response:
    """Queue a pruning job. Omitted parameters take the paper's defaults; the job's `params` shows
    them all once the worker has resolved the budget against the dataset."""
    ctx = get_ctx(request)
    checked_id("ds", req.dataset_id, "dataset")
    try:
        job, created = create_prune_job(ctx.store, ctx.celery, ctx.settings, ctx.llms, tenant, req, idempotency_key,
                                        quotas=ctx.quotas)
    except JobRequestError as exc:
        raise ApiError(exc.status, exc.code, exc.message, **exc.extra) from None
    out = _out(ctx, tenant, [job])[0]
    return JSONResponse(out.model_dump(mode="json"), status_code=202 if created else 200,
                        headers={"Location": f"/v1/jobs/{job.id}",
                                 **({} if created else {"Idempotent-Replayed": "true"})})


@router.get("/jobs", response_model=JobList, responses=openapi.LIST)
def list_jobs(request: Request, tenant: str = Depends(require_tenant), status: JobStatusFilter | None = None,
              cursor: str | None = Query(None, max_length=64), limit: int = Query(50, ge=1, le=200)) -> JobList:
    ctx = get_ctx(request)
    items, nxt = ctx.store.list_jobs(tenant, status, cursor, limit)
    return JobList(items=_out(ctx, tenant, items), next_cursor=nxt)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=openapi.JOB)
def get_job(job_id: openapi.JobId, request: Request, tenant: str = Depends(require_tenant)) -> JobOut:
    ctx = get_ctx(request)
    return _out(ctx, tenant, [_job(ctx, job_id, tenant)])[0]


def _out(ctx: ServiceContext, tenant: str, jobs: list[JobRecord]) -> list[JobOut]:
    """The jobs as the API shows them, a queued one with its place among the tenant's held jobs."""
    held = ctx.quotas.held_positions(tenant, [j.id for j in jobs if j.status == "queued"])
    return [JobOut.of(j, held.get(j.id)) for j in jobs]


@router.get("/jobs/{job_id}/events", response_model=EventList, responses=openapi.JOB)
def job_events(job_id: openapi.JobId, request: Request, tenant: str = Depends(require_tenant),
               after: int = Query(0, ge=0, le=MAX_EVENT_ID, description="return events with id > after"),
               limit: int = Query(100, ge=1, le=1000)) -> EventList:
    ctx = get_ctx(request)
    _job(ctx, job_id, tenant)
    items, more = ctx.store.events(job_id, after, limit)
    return EventList(items=items, has_more=more, next_after=items[-1].id if items else after)


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobOut, responses=openapi.CANCEL)
def cancel_job(job_id: openapi.JobId, request: Request, tenant: str = Depends(require_tenant)) -> JobOut:
    """A queued job, a running one waiting in a queue between two of its tasks, or one whose worker
    is loading the LLM, is cancelled at once; one that a worker runs stops within one batch of its
    stage."""
    ctx = get_ctx(request)
    job = _job(ctx, job_id, tenant)
    if job.status in TERMINAL:
        raise _finished(job_id, job.status)
    # Logged before the flag is set: the worker's "job cancelled" must come after it.
    ctx.store.add_event(job_id, "cancel requested", level="warning", status_before=job.status)
    try:
        before = ctx.store.request_cancel(job_id)
        if before == "running" and (ctx.store.cancel_if_waiting(job_id, ctx.settings.lock_ttl_s)
                                    or ctx.store.cancel_if_blocked(job_id)):
            # Between two tasks (nothing runs it), or its worker is loading the LLM (and stops when
            # the load ends): it ends now, with its partial outputs.
            ctx.files.remove(ctx.files.job_dir(job_id))
            ctx.store.add_event(job_id, "job cancelled", level="warning")
    except StoreError as exc:
        if exc.code == "invalid_transition":  # it finished in the meantime
            raise _finished(job_id, exc.extra.get("status")) from None
        raise
    job = _job(ctx, job_id, tenant)
    if job.status in TERMINAL:  # ended now: its quota slot is free for the tenant's next held job
        release_held(ctx.store, ctx.quotas, ctx.celery, tenant)
    return JobOut.of(job)


def _finished(job_id: str, status: str | None) -> ApiError:
    return ApiError(409, "job_finished", f"job {job_id} has already finished ({status})", status=status)


def _artifact(ctx: ServiceContext, job_id: str, tenant: str, name: str, media: str) -> FileResponse:
    job = _job(ctx, job_id, tenant)
    if job.status != "succeeded":
        raise ApiError(409, "job_not_succeeded", f"job {job_id} is {job.status}; results exist once it succeeded",
                       status=job.status)
    path = ctx.files.job_file(job_id, name)
    if not path.is_file():
        raise ApiError(404, "artifact_missing", f"{name} of job {job_id} is no longer stored")
    return FileResponse(path, media_type=media, filename=name)


@router.get("/jobs/{job_id}/selection", response_class=FileResponse,
            responses=openapi.download({"application/json": openapi.JSON_OBJECT, "text/csv": openapi.TEXT}))
def selection(job_id: openapi.JobId, request: Request, tenant: str = Depends(require_tenant),
              format: Literal["json", "csv"] = "json") -> FileResponse:
    """The selected samples: `selection.json` (the schema `dealrec prune` writes) or `selection.csv`."""
    name, media = ("selection.json", "application/json") if format == "json" else ("selection.csv", "text/csv")
    return _artifact(get_ctx(request), job_id, tenant, name, media)


@router.get("/jobs/{job_id}/scores", response_class=FileResponse,
            responses=openapi.download({"text/csv": openapi.TEXT}))
def scores(job_id: openapi.JobId, request: Request, tenant: str = Depends(require_tenant),
           format: Literal["csv"] = "csv") -> FileResponse:
    """Every sample's influence, effort and overall score, stratum and whether it was selected."""
    return _artifact(get_ctx(request), job_id, tenant, "scores.csv", "text/csv")


@router.get("/jobs/{job_id}/diagnostics", response_class=FileResponse,
            responses=openapi.download({"application/json": openapi.JSON_OBJECT}))
def diagnostics(job_id: openapi.JobId, request: Request, tenant: str = Depends(require_tenant)) -> FileResponse:
    """What the selection holds against its pool (`diagnostics.json`, as `dealrec prune` writes it):
    quantiles of history length, prompt tokens and target-item popularity (selected vs all), how each
    stratum was filled, and the Spearman correlation of each score with prompt length."""
    return _artifact(get_ctx(request), job_id, tenant, "diagnostics.json", "application/json")


@router.get("/jobs/{job_id}/bigrec_train.jsonl", response_class=FileResponse,
            responses=openapi.download({"application/x-ndjson": openapi.TEXT}))
def bigrec_train(job_id: openapi.JobId, request: Request, tenant: str = Depends(require_tenant)) -> FileResponse:
    """The selected samples as BIGRec instruction records, ready for LoRA fine-tuning."""
    return _artifact(get_ctx(request), job_id, tenant, "bigrec_train.jsonl", "application/x-ndjson")


@router.get("/jobs/{job_id}/adapter", response_class=FileResponse,
            responses=openapi.download({"application/gzip": openapi.BINARY},
                                       missing="no such job, the job did not fine-tune, or the file is no longer "
                                               "stored"))
def adapter(job_id: openapi.JobId, request: Request, tenant: str = Depends(require_tenant)) -> FileResponse:
    """The LoRA adapter fine-tuned on the selection (jobs started with `finetune`): a .tar.gz of the
    peft folder `adapter/` (adapter_config.json, adapter_model.safetensors, finetune.json)."""
    ctx = get_ctx(request)
    job = _job(ctx, job_id, tenant)
    if job.status == "succeeded" and not (job.request or {}).get("finetune"):
        raise ApiError(404, "no_adapter", f"job {job_id} did not fine-tune the LLM (start it with \"finetune\")")
    return _artifact(ctx, job_id, tenant, "adapter.tar.gz", "application/gzip")
