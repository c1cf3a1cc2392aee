"""Operational endpoints: /healthz, /readyz, /metrics.

/healthz and /readyz answer without a key (probes carry none). /readyz tells anyone whether Redis
answers and how many workers are alive; the workers' identities (host:pid) only to a request with a
tenant's key or a metrics token, since they map the deployment. /metrics answers only the metrics
tokens, credentials apart from the tenants' keys (queue depth and job counts are every tenant's
together: one tenant must not watch another's burst): the metrics token (`DEALREC_METRICS_TOKEN`, a
scraper's) gets the series of all tenants together and never a tenant's name; the admin token
(`DEALREC_METRICS_ADMIN_TOKEN`, the operators') gets a series per tenant besides, read from what the
quotas keep in Redis. With neither token configured /metrics is off (404)."""

from __future__ import annotations

import logging
from typing import Literal

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from app import openapi
from app.auth import declare_metrics_token
from app.context import get_ctx
from app.errors import ApiError, error_body
from app.metrics import render_metrics
from worker.celery_app import QUEUES

log = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])


class ReadyChecks(BaseModel):
    redis: bool = Field(description="Redis answered PING")
    workers: int = Field(description="workers with a fresh heartbeat")
    queues: dict[str, int] = Field(description="queue -> live workers consuming it (a worker whose heartbeat "
                                               "does not name its queues counts for each)")
    unserved: list[str] = Field(description="queues no live worker consumes: `cpu` there means not ready (every "
                                            "job and upload starts there); the LLM queue there "
                                            "(DEALREC_LLM_QUEUE) means jobs that need the LLM wait")
    worker_ids: list[str] | None = Field(None, description="host:pid of each: only to a tenant's key or a "
                                                           "metrics token")


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: ReadyChecks


@router.get("/healthz")
def healthz() -> dict:
    """The process is alive (no dependency is checked)."""
    return {"status": "ok"}


_unserved_llm_queue: str | None = None  # what was last logged, so that probes every few seconds log it once


def _note_llm_queue(unserved: str | None) -> None:
    """Log when the LLM queue loses its last worker (and when it has one again), not at every probe;
    a server without any LLM (DEALREC_LLMS=none) never needs that queue."""
    global _unserved_llm_queue
    if unserved != _unserved_llm_queue:
        if unserved:
            log.warning("no live worker consumes the %s queue (DEALREC_LLM_QUEUE): jobs that need the LLM wait",
                        unserved)
        else:
            log.info("the %s queue has a live worker again", _unserved_llm_queue)
        _unserved_llm_queue = unserved


@router.get("/readyz", response_model=Readiness, responses=openapi.READY, openapi_extra=openapi.OPTIONAL_CREDENTIALS)
def readyz(request: Request) -> JSONResponse:
    """Redis answers PING and a worker consuming the `cpu` queue has a fresh heartbeat (every upload
    and job starts there): `checks.redis`, `checks.workers` (how many are alive), `checks.queues`
    (how many consume each queue) and `checks.unserved` (queues no worker consumes: the LLM queue
    there is ready with a warning, since only jobs that need the LLM wait); with a tenant's key or a
    metrics token also `checks.worker_ids` (host:pid of each). A missing or unknown key is not an
    error here.

    Not Celery's control.ping: its replies travel over Redis pub/sub, which kombu does not prefix
    with `global_keyprefix` (kombu#1494), so with our key prefix no worker ever answers; and a
    solo-pool worker busy with a job would not answer anyway. Workers renew their key every
    DEALREC_WORKER_HEARTBEAT_S from a thread of their own, busy or not."""
    ctx = get_ctx(request)
    checks: dict[str, object] = {}
    consumed: dict[str, list[str] | None] = {}
    try:
        checks["redis"] = ctx.store.ping()
        consumed = ctx.store.worker_queues()
    except redis.RedisError as exc:
        checks["redis"] = False
        log.warning("readyz: redis: %s", exc)
    workers = sorted(consumed)
    queues = {q: sum(1 for names in consumed.values() if names is None or q in names) for q in QUEUES}
    checks["workers"] = len(workers)
    checks["queues"] = queues
    checks["unserved"] = [q for q in QUEUES if not queues[q]]
    if request.app.state.auth.is_identified(request.headers.get("authorization")):
        checks["worker_ids"] = workers
    if checks["redis"] and queues["cpu"]:
        _note_llm_queue(ctx.settings.llm_queue if ctx.llms and not queues[ctx.settings.llm_queue] else None)
        return JSONResponse({"status": "ready", "checks": checks})
    reason = ("Redis is unreachable" if not checks["redis"] else "no worker is alive" if not workers else
              "no live worker consumes the cpu queue, where every upload and job starts")
    return JSONResponse(error_body("not_ready", reason, checks=checks), status_code=503)


@router.get("/metrics", response_class=PlainTextResponse, responses=openapi.METRICS,
            dependencies=[Depends(declare_metrics_token)])
def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format: jobs by status, stage durations, queue depth, live workers, for every
    tenant together. Scrape with `Authorization: Bearer <DEALREC_METRICS_TOKEN>`; with
    `DEALREC_METRICS_ADMIN_TOKEN` also each configured tenant's jobs (active, held), datasets and stored bytes."""
    auth = request.app.state.auth
    if not auth.metrics_enabled:
        raise ApiError(404, "metrics_disabled",
                       "metrics are off: set DEALREC_METRICS_TOKEN (or DEALREC_METRICS_ADMIN_TOKEN) and scrape with "
                       "'Authorization: Bearer <token>'")
    scope = auth.metrics_scope(request.headers.get("authorization"))
    if scope is None:
        raise ApiError(401, "unauthorized", "/metrics needs the metrics token: 'Authorization: Bearer <token>' "
                                            "(DEALREC_METRICS_TOKEN; a tenant's API key does not open it)",
                       headers={"WWW-Authenticate": "Bearer"})
    ctx = get_ctx(request)
    tenants = None
    try:
        snap = ctx.store.metrics_snapshot()
        depth = ctx.store.queue_depth(QUEUES, ctx.broker)
        workers = len(ctx.store.live_workers())
        if scope == "admin":
            tenants = ctx.quotas.usage(auth.tenants())
        up = 1
    except redis.RedisError as exc:
        log.warning("metrics: redis: %s", exc)
        snap, depth, workers, up = {"jobs": {}, "stage_seconds": {}, "stage_count": {}}, {}, 0, 0
    return PlainTextResponse(render_metrics(snap, depth, workers, up, tenants),
                             media_type="text/plain; version=0.0.4; charset=utf-8")
