"""/v1/datasets: upload (encoding and headers checked at once, the rest validated asynchronously by a
worker), list, read, delete."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from app import openapi
from app.archives import unpack
from app.auth import require_tenant
from app.context import ServiceContext, checked_id, get_ctx
from app.errors import ApiError, invalid_dataset, not_found
from app.filenames import is_archive
from app.uploads import receive_files
from core.data.errors import DataError
from core.data.precheck import precheck
from worker.celery_app import TASK_VALIDATE, send
from worker.service.jobstore import new_id
from worker.service.records import DatasetRecord, FileInfo
from worker.service.responses import DatasetList, DatasetOut
from worker.service.uploads import validation_sent

log = logging.getLogger(__name__)
router = APIRouter(tags=["datasets"])

@router.post("/datasets", status_code=202, response_model=DatasetOut, openapi_extra=openapi.UPLOAD_BODY,
             responses=openapi.UPLOAD)
async def upload_dataset(request: Request, tenant: str = Depends(require_tenant),
                         name: str | None = Query(None, max_length=200, description="a label for the dataset")
                         ) -> DatasetOut:
    """Stream the files to the storage root and check their encoding and headers (a 400 naming the
    file, line and field, and nothing stored); a worker then validates them in full (`validating` ->
    `ready` | `invalid`)."""
    ctx = get_ctx(request)
    await run_in_threadpool(ctx.quotas.check_storage, tenant)  # a tenant at its limits: 429 before the body
    tmp = await run_in_threadpool(ctx.files.tmp_dir, "upload")
    try:
        files = await _receive(request, ctx, tmp, tmp / "files")
        await run_in_threadpool(_precheck, tmp / "files")
        rec = DatasetRecord(id=new_id("ds"), tenant=tenant, name=name, files=files)
        await run_in_threadpool(_register, ctx, rec, tmp / "files")
        return DatasetOut.of(rec)
    except FileNotFoundError:
        if tmp.exists():  # not the sweep: a server error
            raise
        raise _swept(ctx) from None
    finally:
        await run_in_threadpool(ctx.files.remove, tmp)


@router.post("/datasets/{dataset_id}/versions", status_code=202, response_model=DatasetOut,
             openapi_extra=openapi.UPLOAD_BODY, responses=openapi.NEW_VERSION)
async def extend_dataset(dataset_id: openapi.DatasetId, request: Request, tenant: str = Depends(require_tenant),
                         name: str | None = Query(None, max_length=200, description="a label for the new version")
                         ) -> DatasetOut:
    """A new version of a dataset: its files with the uploaded files appended to those of the same
    name (a repeated header line is dropped) or added. The new version is a dataset of its own
    (`parent_id` names the old one, which is left unchanged); a prune job on it reuses the effort
    scores of every sample whose prompt did not change and starts its surrogate from the previous
    version's (`warm_start`)."""
    from core.data.extend import extend_files

    ctx = get_ctx(request)
    checked_id("ds", dataset_id, "dataset")
    parent = ctx.store.get_dataset(dataset_id, tenant)
    if parent is None:
        raise not_found("dataset", dataset_id)
    if parent.status != "ready":
        raise ApiError(409, "dataset_not_ready", f"dataset {dataset_id} is {parent.status}, not ready")
    await run_in_threadpool(ctx.quotas.check_storage, tenant)  # a version is a dataset of its own
    tmp = await run_in_threadpool(ctx.files.tmp_dir, "upload")
    try:
        await _receive(request, ctx, tmp, tmp / "addition")
        try:
            await run_in_threadpool(extend_files, ctx.files.dataset_files(dataset_id), tmp / "addition",
                                    tmp / "files")
        except DataError as exc:
            raise invalid_dataset(exc, tmp / "addition") from None
        await run_in_threadpool(_precheck, tmp / "files")
        files = [FileInfo(name=p.name, bytes=p.stat().st_size) for p in sorted((tmp / "files").iterdir())]
        rec = DatasetRecord(id=new_id("ds"), tenant=tenant, name=name or parent.name, files=files,
                            parent_id=dataset_id)
        await run_in_threadpool(_register, ctx, rec, tmp / "files")
        return DatasetOut.of(rec)
    except FileNotFoundError:
        if tmp.exists():  # not the sweep: a server error
            raise
        raise _swept(ctx) from None
    finally:
        await run_in_threadpool(ctx.files.remove, tmp)


def _swept(ctx: ServiceContext) -> ApiError:
    """An upload whose partial files the workers' sweep removed: nothing was written to them for
    DEALREC_STALE_UPLOAD_S (a stalled client)."""
    limit = ctx.settings.stale_upload_s
    return ApiError(408, "upload_timeout", f"the upload stalled for more than {limit} s and its partial files "
                    "were removed; send it again", limit=limit)


async def _receive(request: Request, ctx: ServiceContext, tmp: Path, dest: Path) -> list[FileInfo]:
    """The multipart files (several files, or one archive unpacked) into `dest`, within the limits."""
    s = ctx.settings
    raw = tmp / "raw"
    raw.mkdir()
    files = await receive_files(request, raw, s.max_upload_bytes, s.max_upload_files)
    archives = [f for f in files if is_archive(f.name)]
    if archives:
        if len(files) != 1:
            raise ApiError(400, "invalid_request", "send either one archive or the data files, not both")
        return await run_in_threadpool(unpack, raw / archives[0].name, dest, s.max_unpacked_bytes,
                                       s.max_archive_files, s.max_archive_ratio)
    os.rename(raw, dest)
    return files


def _precheck(folder: Path) -> None:
    """The cheap structural checks, before anything is recorded: what they refuse, the worker would
    have marked `invalid` later (save a text file no loader reads: it must be UTF-8 too). Streams each
    text file once, in bounded memory, plus the first MiB of each file the layout reads."""
    try:
        fmt = precheck(folder)
    except DataError as exc:
        error = invalid_dataset(exc, folder)
        log.info("upload refused: %s", error.message)
        raise error from None
    log.debug("upload passed the precheck as %s", fmt)


def _register(ctx: ServiceContext, rec: DatasetRecord, files_dir) -> None:
    """Record (within the tenant's dataset count and stored bytes: 429 past them), then files into
    place, then the validation task: each step only once the one before it held, and undone if the
    queue refuses the task. A record this process leaves behind by dying before the task is sent is
    marked invalid by the workers' sweep (worker/service/uploads.py)."""
    ctx.quotas.admit_dataset(rec)
    try:
        final = ctx.files.dataset_files(rec.id)
        final.parent.mkdir(parents=True, exist_ok=True)
        ctx.files.publish(files_dir, final)
        send(ctx.celery, TASK_VALIDATE, [rec.id], "cpu")
        validation_sent(ctx.store, rec.id)
    except Exception:
        ctx.store.delete_dataset(rec.tenant, rec.id)
        ctx.files.remove(ctx.files.dataset_dir(rec.id))
        raise


@router.get("/datasets", response_model=DatasetList, responses=openapi.LIST)
def list_datasets(request: Request, tenant: str = Depends(require_tenant),
                  cursor: str | None = Query(None, max_length=64), limit: int = Query(50, ge=1, le=200)) -> DatasetList:
    items, nxt = get_ctx(request).store.list_datasets(tenant, cursor, limit)
    return DatasetList(items=[DatasetOut.of(d) for d in items], next_cursor=nxt)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, responses=openapi.DATASET)
def get_dataset(dataset_id: openapi.DatasetId, request: Request, tenant: str = Depends(require_tenant)) -> DatasetOut:
    checked_id("ds", dataset_id, "dataset")
    rec = get_ctx(request).store.get_dataset(dataset_id, tenant)
    if rec is None:
        raise not_found("dataset", dataset_id)
    return DatasetOut.of(rec)


@router.delete("/datasets/{dataset_id}", status_code=204, response_class=Response,
               responses=openapi.DELETE_DATASET)
def delete_dataset(dataset_id: openapi.DatasetId, request: Request, tenant: str = Depends(require_tenant)) -> Response:
    checked_id("ds", dataset_id, "dataset")
    ctx = get_ctx(request)
    outcome = ctx.store.delete_dataset(tenant, dataset_id)
    if outcome == "missing":
        raise not_found("dataset", dataset_id)
    if outcome == "busy":
        raise ApiError(409, "dataset_in_use", f"dataset {dataset_id} is used by a queued or running job")
    ctx.files.remove(ctx.files.dataset_dir(dataset_id))
    return Response(status_code=204)
