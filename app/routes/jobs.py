"""/v1/prune and /v1/jobs: start a job, read it, its events, cancel it, download its results."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError

from app.auth import require_tenant
from app.context import ServiceContext, checked_id, get_ctx
from app.errors import ApiError, not_found
from app.schemas import EventList, JobList, JobOut
from core.selection import required_scores
from worker.celery_app import TASK_RUN
from worker.plan import first_queue
from worker.models import TERMINAL, JobRecord
from worker.params import PruneRequest, to_config, to_finetune_config
from worker.store import StoreError, new_id

log = logging.getLogger(__name__)
router = APIRouter(tags=["jobs"])

JobStatusFilter = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def _job(ctx: ServiceContext, job_id: str, tenant: str) -> JobRecord:
    checked_id("job", job_id, "job")
    job = ctx.store.get_job(job_id, tenant)
    if job is None:
        raise not_found("job", job_id)
    return job


@router.post("/prune", status_code=202, response_model=JobOut,
             responses={200: {"description": "an earlier job with the same Idempotency-Key"},
                        409: {"description": "dataset not ready, or Idempotency-Key reused with another request"}})
def start_prune(req: PruneRequest, request: Request, tenant: str = Depends(require_tenant),
                idempotency_key: str | None = Header(None, max_length=200)) -> Response:
    """Queue a pruning job. Omitted parameters take the paper's defaults; the job's `params` shows
    them all once the worker has resolved the budget against the dataset."""
    ctx = get_ctx(request)
    checked_id("ds", req.dataset_id, "dataset")
    dataset = ctx.store.get_dataset(req.dataset_id, tenant)
    if dataset is None:
        raise not_found("dataset", req.dataset_id)
    if dataset.status != "ready":
        raise ApiError(409, "dataset_not_ready", f"dataset {req.dataset_id} is {dataset.status}, not ready",
                       dataset_status=dataset.status, errors=[e.model_dump() for e in dataset.errors] or None)
    needs_llm = "effort" in required_scores(req.method) or req.finetune is not None
    if needs_llm and req.params.effort.llm not in ctx.llms:
        raise ApiError(422, "invalid_request", f"params.effort.llm: unknown model '{req.params.effort.llm}'; "
                       f"this server offers {', '.join(sorted(ctx.llms))}", field="params.effort.llm")
    n_users = int((dataset.statistics or {}).get("users", 1))
    n_samples = min(n_users, req.limit_users) if req.limit_users else n_users
    try:
        cfg = to_config(req, n_samples, device=ctx.settings.device)
    except ValidationError as exc:  # cross-field rules of core's config
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        raise ApiError(422, "invalid_request", f"{field}: {first['msg']}", field=field) from None
    if req.finetune is not None:
        try:
            to_finetune_config(req, device=ctx.settings.device)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(["finetune", *(str(x) for x in first["loc"])])
            raise ApiError(422, "invalid_request", f"{field}: {first['msg']}", field=field) from None
    body = req.model_dump(mode="json", by_alias=True)
    queue = first_queue(req.method, ctx.settings)
    params = {**cfg.model_dump(mode="json", by_alias=True), "limit_users": req.limit_users, "split": req.split}
    params["effort"]["llm"] = req.params.effort.llm
    job = JobRecord(id=new_id("job"), tenant=tenant, dataset_id=req.dataset_id, queue=queue, request=body,
                    params=params)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    job, created = ctx.store.create_job(job, idempotency_key, digest)
    if created:
        # Before the task exists, so that it is the job's first event whatever the worker does.
        ctx.store.add_event(job.id, "job queued", queue=queue)
        try:
            ctx.celery.send_task(TASK_RUN, args=[job.id, queue], queue=queue)
        except Exception:
            # Never leave a job queued that no worker will ever see.
            ctx.store.transition(job.id, "failed", error={"code": "enqueue_failed",
                                                          "message": "the task queue refused the job"})
            ctx.store.add_event(job.id, "job failed: the task queue refused it", level="error")
            raise
    out = JobOut.of(job)
    return JSONResponse(out.model_dump(mode="json"), status_code=202 if created else 200,
                        headers={"Location": f"/v1/jobs/{job.id}",
                                 **({} if created else {"Idempotent-Replayed": "true"})})


@router.get("/jobs", response_model=JobList)
def list_jobs(request: Request, tenant: str = Depends(require_tenant), status: JobStatusFilter | None = None,
              cursor: str | None = Query(None, max_length=64), limit: int = Query(50, ge=1, le=200)) -> JobList:
    items, nxt = get_ctx(request).store.list_jobs(tenant, status, cursor, limit)
    return JobList(items=[JobOut.of(j) for j in items], next_cursor=nxt)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, request: Request, tenant: str = Depends(require_tenant)) -> JobOut:
    return JobOut.of(_job(get_ctx(request), job_id, tenant))


@router.get("/jobs/{job_id}/events", response_model=EventList)
def job_events(job_id: str, request: Request, tenant: str = Depends(require_tenant),
               after: int = Query(0, ge=0, description="return events with id > after"),
               limit: int = Query(100, ge=1, le=1000)) -> EventList:
    ctx = get_ctx(request)
    _job(ctx, job_id, tenant)
    items, more = ctx.store.events(job_id, after, limit)
    return EventList(items=items, has_more=more, next_after=items[-1].id if items else after)


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobOut,
             responses={409: {"description": "the job has already finished"}})
def cancel_job(job_id: str, request: Request, tenant: str = Depends(require_tenant)) -> JobOut:
    """A queued job, or a running one waiting in a queue between two of its tasks, is cancelled at
    once; one that a worker runs stops within one batch of its stage."""
    ctx = get_ctx(request)
    job = _job(ctx, job_id, tenant)
    if job.status in TERMINAL:
        raise _finished(job_id, job.status)
    # Logged before the flag is set: the worker's "job cancelled" must come after it.
    ctx.store.add_event(job_id, "cancel requested", level="warning", status_before=job.status)
    try:
        before = ctx.store.request_cancel(job_id)
        if before == "running" and ctx.store.cancel_if_waiting(job_id, ctx.settings.lock_ttl_s):
            # Between two tasks: nothing runs it, so it ends now, with its partial outputs.
            ctx.storage.remove(ctx.storage.job_dir(job_id))
            ctx.store.add_event(job_id, "job cancelled", level="warning")
    except StoreError as exc:
        if exc.code == "invalid_transition":  # it finished in the meantime
            raise _finished(job_id, exc.extra.get("status")) from None
        raise
    return JobOut.of(_job(ctx, job_id, tenant))


def _finished(job_id: str, status: str | None) -> ApiError:
    return ApiError(409, "job_finished", f"job {job_id} has already finished ({status})", status=status)


def _artifact(ctx: ServiceContext, job_id: str, tenant: str, name: str, media: str) -> FileResponse:
    job = _job(ctx, job_id, tenant)
    if job.status != "succeeded":
        raise ApiError(409, "job_not_succeeded", f"job {job_id} is {job.status}; results exist once it succeeded",
                       status=job.status)
    path = ctx.storage.job_file(job_id, name)
    if not path.is_file():
        raise ApiError(404, "artifact_missing", f"{name} of job {job_id} is no longer stored")
    return FileResponse(path, media_type=media, filename=name)


@router.get("/jobs/{job_id}/selection", response_class=FileResponse,
            responses={200: {"content": {"application/json": {}, "text/csv": {}}}})
def selection(job_id: str, request: Request, tenant: str = Depends(require_tenant),
              format: Literal["json", "csv"] = "json") -> FileResponse:
    """The selected samples: `selection.json` (the schema `dealrec prune` writes) or `selection.csv`."""
    name, media = ("selection.json", "application/json") if format == "json" else ("selection.csv", "text/csv")
    return _artifact(get_ctx(request), job_id, tenant, name, media)


@router.get("/jobs/{job_id}/scores", response_class=FileResponse, responses={200: {"content": {"text/csv": {}}}})
def scores(job_id: str, request: Request, tenant: str = Depends(require_tenant),
           format: Literal["csv"] = "csv") -> FileResponse:
    """Every sample's influence, effort and overall score, stratum and whether it was selected."""
    return _artifact(get_ctx(request), job_id, tenant, "scores.csv", "text/csv")


@router.get("/jobs/{job_id}/diagnostics", response_class=FileResponse,
            responses={200: {"content": {"application/json": {}}}})
def diagnostics(job_id: str, request: Request, tenant: str = Depends(require_tenant)) -> FileResponse:
    """What the selection holds against its pool (`diagnostics.json`, as `dealrec prune` writes it):
    quantiles of history length, prompt tokens and target-item popularity (selected vs all), how each
    stratum was filled, and the Spearman correlation of each score with prompt length."""
    return _artifact(get_ctx(request), job_id, tenant, "diagnostics.json", "application/json")


@router.get("/jobs/{job_id}/bigrec_train.jsonl", response_class=FileResponse,
            responses={200: {"content": {"application/x-ndjson": {}}}})
def bigrec_train(job_id: str, request: Request, tenant: str = Depends(require_tenant)) -> FileResponse:
    """The selected samples as BIGRec instruction records, ready for LoRA fine-tuning."""
    return _artifact(get_ctx(request), job_id, tenant, "bigrec_train.jsonl", "application/x-ndjson")


@router.get("/jobs/{job_id}/adapter", response_class=FileResponse,
            responses={200: {"content": {"application/gzip": {}}},
                       404: {"description": "no such job, or the job did not fine-tune"}})
def adapter(job_id: str, request: Request, tenant: str = Depends(require_tenant)) -> FileResponse:
    """The LoRA adapter fine-tuned on the selection (jobs started with `finetune`): a .tar.gz of the
    peft folder `adapter/` (adapter_config.json, adapter_model.safetensors, finetune.json)."""
    ctx = get_ctx(request)
    job = _job(ctx, job_id, tenant)
    if job.status == "succeeded" and not (job.request or {}).get("finetune"):
        raise ApiError(404, "no_adapter", f"job {job_id} did not fine-tune the LLM (start it with \"finetune\")")
    return _artifact(ctx, job_id, tenant, "adapter.tar.gz", "application/gzip")
