"""One shard of a job's effort stage, as a Celery task on the LLM queue.

The job's own task split the samples the per-sample store did not hold yet into length-balanced
shards (`JobStore.plan_shards`) and sent one task per shard, with the job's continuation as the
chord's body. Any worker on the queue takes a shard: it scores the shard's samples that the store
still lacks (a redelivered shard recomputes only what its first run did not store) and stores them
batch by batch; progress is counted in prompt tokens over all shards; a cancel stops it within one
batch. A shard never raises: a failure fails the job, which the continuation then finds finished.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import redis

from core.data import DataError, load_dataset
from core.device import resolve_device
from core.effort.llm import LLMError
from core.effort.prompts import PromptTemplate
from core.effort.score import EffortCancelled
from core.progress import stage_phases
from core.stages.effort import effort_pool, fill_pool
from core.surrogate.train import Cancelled
from worker.deliveries import PARKED_CODE, PARKED_JOB, Delivery
from worker.progress import CancelCheck
from worker.runner import describe, relative_error
from worker.service.files import Files
from worker.service.jobstore import JobStore
from worker.service.plan import request_stages
from worker.service.requests import PruneRequest, to_config
from worker.service.settings import Settings

log = logging.getLogger(__name__)

# The loaded LLM, kept between the shards a worker process takes (one model at a time).
_MODELS: dict = {}
WORKER = f"{socket.gethostname()}:{os.getpid()}"


def run_effort_shard(store: JobStore, files: Files, settings: Settings, job_id: str, index: int) -> str:
    """Score shard `index` of the job's effort; returns what happened ("done", "cancelled", the job's
    status when it is no longer running, or "failed")."""
    job = store.get_job(job_id)
    if job is None or job.status != "running":
        return job.status if job else "missing"
    plan = store.shard_plan(job_id)
    if plan is None or index >= len(plan["plan"]):
        return "no-shard"  # the job merged this round already (a late redelivery)
    with Delivery(store, f"shard:{job_id}:{job.effort_rounds}:{index}") as delivery:
        if delivery.parked:
            return _fail(store, job_id, PARKED_CODE, PARKED_JOB, shard=index)
        return _run_shard(store, files, settings, job, plan, index)


def _run_shard(store: JobStore, files: Files, settings: Settings, job, plan: dict, index: int) -> str:
    job_id = job.id
    users, shard_tokens = plan["plan"][index], plan["tokens"][index]
    cancel = CancelCheck(store, job_id, threading.Event(), time.monotonic() + settings.task_time_limit_s)
    if cancel():
        return "cancelled"
    req = PruneRequest.model_validate(job.request)
    phases = stage_phases(request_stages(req))
    dataset_dir = files.dataset_files(job.dataset_id)
    last_write = [0.0]

    def progress(frac: float, _msg: str = "") -> None:
        now = time.monotonic()
        if now - last_write[0] < settings.progress_interval_s and frac < 1.0:
            return
        last_write[0] = now
        try:
            done = store.shard_progress(job_id, index, int(frac * shard_tokens))
            store.update_job(job_id, allowed=["running"], stage="effort",
                             progress=round(phases.fraction("effort", done), 4))
        except redis.RedisError as exc:  # progress must not kill a shard
            log.warning("job %s shard %d: progress not recorded (%s)", job_id, index, exc)

    try:
        record = store.get_dataset(job.dataset_id)
        ds = load_dataset(dataset_dir, fmt=(record.format if record and record.format else "auto"),
                          split=req.split, limit_users=req.limit_users)
        llm_path = settings.llm_choices().get(req.params.effort.llm, "auto")
        cfg = to_config(req, ds.n_samples, device=settings.device, llm_path=llm_path)
        dev = resolve_device(settings.device)
        pool = effort_pool(ds, cfg.effort, dev, settings.cache_root, PromptTemplate(), users=users)
        t0 = time.perf_counter()
        scored, _ = fill_pool(pool, cfg.effort, dev, settings.cache_root, PromptTemplate(), progress, cancel,
                              model_cache=_MODELS)
        progress(1.0)
        log.info("job %s shard %d: %d of %d samples scored in %.1f s", job_id, index, scored, len(users),
                 time.perf_counter() - t0)
        store.add_event(job_id, f"effort shard {index + 1}/{len(plan['plan'])} done", level="debug",
                        shard=index, scored=scored, samples=len(users), worker=WORKER)
        return "done"
    except (Cancelled, EffortCancelled):
        return "cancelled"
    except redis.RedisError:
        raise  # the task retries once the store is back
    except DataError as exc:
        info = relative_error(exc, dataset_dir)
        return _fail(store, job_id, "invalid_dataset", describe(info), **info)
    except LLMError as exc:
        return _fail(store, job_id, "llm_unavailable", str(exc))
    except Exception as exc:  # noqa: BLE001 - a shard must end the job cleanly, never hang the chord
        log.exception("job %s shard %d failed", job_id, index)
        return _fail(store, job_id, "internal_error", f"effort shard {index}: {type(exc).__name__}: {exc}")


def _fail(store: JobStore, job_id: str, code: str, message: str, /, **extra) -> str:
    from worker.service.jobstore import StoreError

    extra.pop("message", None)  # as JobRunner.fail: a loader error dict passed as **extra
    try:
        store.transition(job_id, "failed", handoff=None, error={"code": code, "message": message, **extra})
        store.add_event(job_id, f"job failed: {message}", level="error", code=code)
    except StoreError:  # it had ended meanwhile (cancelled, or another shard failed it)
        pass
    return "failed"
