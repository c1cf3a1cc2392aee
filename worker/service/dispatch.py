"""Handing released jobs to the broker (fair dispatch: worker/service/quotas.py).

The one place that sends the first task of a job that left its tenant's held list: for the API
(a new job, a cancel), for the workers (a job ended) and for the reaper (a release or a send that
a process left undone when it died). A failed send leaves the job in `dispatching`, where the
reaper finds it again; nothing here raises for Redis or the broker being away."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis
from celery import Celery

from worker.celery_app import TASK_RUN, send
from worker.service.jobstore import JobStore
from worker.service.quotas import TenantQuotas

log = logging.getLogger(__name__)


def send_released(store: JobStore, quotas: TenantQuotas, celery: Celery, job_ids: Iterable[str],
                  again: bool = False) -> list[str]:
    """Send the first task of each job (released from a held list, or claimed by the reaper:
    `again`); returns those sent. A job no longer queued (cancelled meanwhile, or already started
    by an earlier message) only leaves `dispatching`."""
    sent = []
    for job_id in job_ids:
        try:
            job = store.get_job(job_id)
            if job is None or job.status != "queued":
                quotas.dispatched([job_id])
                continue
            if again:
                store.add_event(job_id, "job handed to the workers again: the process that released it stopped "
                                        "before sending it", level="warning", queue=job.queue)
            else:
                store.add_event(job_id, "job handed to the workers", queue=job.queue)
            send(celery, TASK_RUN, [job_id, job.queue], job.queue)
            quotas.dispatched([job_id])
        except Exception as exc:  # noqa: BLE001 - Redis or the broker away: the reaper sends it later
            log.warning("job %s: not handed to the workers yet (%s); the reaper will", job_id, exc)
            continue
        log.info("job %s released to the %s queue", job_id, job.queue)
        sent.append(job_id)
    return sent


def release_held(store: JobStore, quotas: TenantQuotas, celery: Celery, tenant: str) -> list[str]:
    """After one of the tenant's jobs ended (or was cancelled): hand its next held jobs to the
    broker, as many as its free slots; returns those sent."""
    try:
        ids = quotas.release(tenant)
    except redis.RedisError as exc:
        log.warning("tenant %s: held jobs not released (%s); the reaper will", tenant, exc)
        return []
    return send_released(store, quotas, celery, ids)


def recover_dispatch(store: JobStore, quotas: TenantQuotas, celery: Celery, stale_s: float) -> list[str]:
    """The reaper's part: send again what a dead process released (or created) and never sent, and
    release the held jobs of every tenant with a free slot (a process died between ending a job and
    releasing the next). Returns the jobs sent."""
    out = send_released(store, quotas, celery, quotas.claim_stale(stale_s), again=True)
    for tenant in quotas.tenants_waiting():
        out += release_held(store, quotas, celery, tenant)
    if out:
        log.warning("reaper: %d held or unsent jobs handed to the workers", len(out))
    return out
