"""Operational endpoints, without authentication (probes and scrapers carry no keys; nothing here
names a tenant's data): /healthz, /readyz, /metrics."""

from __future__ import annotations

import logging

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from app.context import get_ctx
from app.errors import error_body
from app.metrics import render_metrics
from worker.celery_app import QUEUES

log = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is alive (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Redis unreachable or no worker alive"}})
def readyz(request: Request) -> JSONResponse:
    """Redis answers PING and at least one worker's heartbeat key is fresh.

    Not Celery's control.ping: its replies travel over Redis pub/sub, which kombu does not prefix
    with `global_keyprefix` (kombu#1494), so with our key prefix no worker ever answers; and a
    solo-pool worker busy with a job would not answer anyway. Workers renew their key every
    DEALREC_WORKER_HEARTBEAT_S from a thread of their own, busy or not."""
    ctx = get_ctx(request)
    checks: dict[str, object] = {}
    workers: list[str] = []
    try:
        checks["redis"] = ctx.store.ping()
        workers = ctx.store.live_workers()
    except redis.RedisError as exc:
        checks["redis"] = False
        log.warning("readyz: redis: %s", exc)
    checks["workers"] = workers
    if checks["redis"] and workers:
        return JSONResponse({"status": "ready", "checks": checks})
    reason = "Redis is unreachable" if not checks["redis"] else "no worker is alive"
    return JSONResponse(error_body("not_ready", reason, checks=checks), status_code=503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format: jobs by status, stage durations, queue depth, live workers."""
    ctx = get_ctx(request)
    try:
        snap = ctx.store.metrics_snapshot()
        depth = ctx.store.queue_depth(QUEUES, ctx.broker)
        workers = len(ctx.store.live_workers())
        up = 1
    except redis.RedisError as exc:
        log.warning("metrics: redis: %s", exc)
        snap, depth, workers, up = {"jobs": {}, "stage_seconds": {}, "stage_count": {}}, {}, 0, 0
    return PlainTextResponse(render_metrics(snap, depth, workers, up),
                             media_type="text/plain; version=0.0.4; charset=utf-8")
