"""Celery tasks. Each is a thin shell: the work is in `validation` and `runner`, the state in the store.

A job is a chain of `run_job` tasks, one per run of consecutive stages on one queue: surrogate and
influence on `cpu`, effort on the LLM queue (`DEALREC_LLM_QUEUE`, default `gpu`), selection and
outputs on `cpu`; each task sends the next."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from functools import lru_cache

import redis
from celery.signals import worker_ready, worker_shutdown

from core.data.errors import clip
from worker.celery_app import TASK_EFFORT_SHARD, TASK_RUN, TASK_SWEEP, TASK_VALIDATE, app, send
from worker.service.dispatch import recover_dispatch, release_held
from worker.service.files import Files
from worker.service.handoffs import confirm_handoff
from worker.service.jobstore import JobStore
from worker.service.quotas import TenantQuotas
from worker.service.records import TERMINAL
from worker.service.settings import get_settings
from worker.service.uploads import sweep_abandoned

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _context() -> tuple[JobStore, Files]:
    settings = get_settings()
    return JobStore.from_settings(settings), Files(settings.data_dir)


@lru_cache(maxsize=1)
def _quotas() -> TenantQuotas:
    return TenantQuotas.from_settings(_context()[0], get_settings())


@app.task(name=TASK_VALIDATE, bind=True, acks_late=True, time_limit=get_settings().validate_time_limit_s + 30,
          soft_time_limit=get_settings().validate_time_limit_s)
def validate_dataset(self, dataset_id: str) -> str:
    from worker.validation import validate_dataset as validate

    store, files = _context()
    return validate(store, files, dataset_id)


@app.task(name=TASK_RUN, bind=True, acks_late=True, max_retries=None)
def run_job(self, job_id: str, queue: str) -> str:
    """Run the job's next stages that belong to `queue`, then send it to the queue of the stages after.

    Nothing runs unless this worker holds the job's lock. A redelivered message for a job still
    running elsewhere is retried after the lock's TTL: if that worker died, the lock has lapsed by
    then and this one resumes the job; if the job moved on or finished, the retry finds that out.
    The next task is sent after the lock is released, and before this message is acknowledged: a
    worker dying in between leaves this message to be redelivered, which sends it again."""
    from worker.runner import JobRunner

    settings = get_settings()
    store, files = _context()
    job = store.get_job(job_id)
    if job is None or job.status not in ("queued", "running"):
        log.info("job %s: nothing to do (%s)", job_id, job.status if job else "expired")
        if job is not None:  # ended elsewhere (a chord's body after a shard failed the job): its slot is free
            release_held(store, _quotas(), app, job.tenant)
        return job.status if job else "missing"
    lock = store.job_lock(job_id, settings.lock_ttl_s)
    if not lock.acquire():
        wait = max(1.0, lock.remaining_s() + 0.5)
        log.info("job %s is locked by another worker; retrying in %.1f s", job_id, wait)
        raise self.retry(countdown=wait)
    try:
        with lock.keepalive():
            outcome = JobRunner(store, files, settings, job_id, lock).run(queue)
    except redis.RedisError as exc:
        # The store went away mid-job (the runner turns every other error into a job status).
        # Run it again later: finished stages are recorded, their artifacts are in the cache.
        log.warning("job %s: job store unavailable (%s); retrying", job_id, exc)
        raise self.retry(countdown=settings.lock_ttl_s, exc=exc) from exc
    if outcome.status in TERMINAL:  # its quota slot is free: the tenant's next held job goes to the workers
        release_held(store, _quotas(), app, job.tenant)
    if outcome.shards:
        try:
            send_shards(job_id, outcome.shards, outcome.shard_queue)
        except Exception as exc:  # noqa: BLE001 - broker down: this message stays unacked and comes back
            log.warning("job %s: could not send its effort shards (%s); retrying", job_id, exc)
            raise self.retry(countdown=settings.lock_ttl_s, exc=exc) from exc
        confirm_handoff(store, job_id, outcome.handoff_id)
        log.info("job %s: effort in %d shard tasks on the %s queue", job_id, outcome.shards, outcome.shard_queue)
    if outcome.next_queue:
        try:
            send(app, TASK_RUN, [job_id, outcome.next_queue], outcome.next_queue)
        except Exception as exc:  # noqa: BLE001 - broker down: this message stays unacked and comes back
            log.warning("job %s: could not hand over to %s (%s); retrying", job_id, outcome.next_queue, exc)
            raise self.retry(countdown=settings.lock_ttl_s, exc=exc) from exc
        confirm_handoff(store, job_id, outcome.handoff_id)
        log.info("job %s handed to the %s queue", job_id, outcome.next_queue)
    return outcome.status


def send_shards(job_id: str, n: int, queue: str) -> None:
    """The job's effort shards as one Celery chord: any worker on `queue` takes any shard; when all
    have returned, the chord's body continues the job (its effort stage then reads the store)."""
    from celery import chord

    header = [app.signature(TASK_EFFORT_SHARD, args=[job_id, i], queue=queue, immutable=True) for i in range(n)]
    chord(header)(app.signature(TASK_RUN, args=[job_id, queue], queue=queue, immutable=True, ignore_result=True))


class TaskError(Exception):
    """Raised by a task whose result Celery stores (an effort shard) in place of an unexpected
    error: the original's message may echo any input, this one is clipped."""


def _short(exc: BaseException) -> TaskError:
    return TaskError(clip(f"{type(exc).__name__}: {clip(str(exc))}"))


# ignore_result=False: a chord counts its header's results (the app's default ignores them).
@app.task(name=TASK_EFFORT_SHARD, bind=True, acks_late=True, max_retries=None, ignore_result=False)
def effort_shard(self, job_id: str, index: int) -> str:
    """One shard of a job's effort stage (worker/effort_shards.py). Celery stores what it returns or
    raises: a short status, a retry with a short error, or a TaskError, never a long message."""
    from worker.effort_shards import run_effort_shard

    try:
        settings = get_settings()
        store, files = _context()
        return run_effort_shard(store, files, settings, job_id, index)
    except redis.RedisError as exc:
        log.warning("job %s shard %d: job store unavailable (%s); retrying", job_id, index, exc)
        raise self.retry(countdown=get_settings().lock_ttl_s, exc=_short(exc)) from None
    except Exception as exc:  # noqa: BLE001 - run_effort_shard catches the rest; this is the last guard
        log.exception("job %s shard %d crashed", job_id, index)
        raise _short(exc) from None


@app.task(name=TASK_SWEEP)
def sweep_storage() -> int:
    """Folders of expired jobs and deleted datasets, stale temporary folders, abandoned uploads; the
    first two only while the store and the data folder are paired (Files.paired)."""
    store, files = _context()
    stale_s = get_settings().stale_upload_s
    removed = files.sweep(store.job_exists, store.dataset_exists, stale_s) if files.paired(store) \
        else files.sweep_tmp(stale_s)
    return removed + len(sweep_abandoned(store, files, stale_s))


_storage_sweeper: threading.Thread | None = None


def sweep_storage_once(store: JobStore, holder: str, period_s: float) -> None:
    """The periodic storage sweep, by the one worker that claims this period, on a thread of its own
    (a first sweep may have weeks of folders to delete: the heartbeat must not wait for it); never
    raises."""
    global _storage_sweeper
    if _storage_sweeper is not None and _storage_sweeper.is_alive():
        return
    try:
        if not store.claim_storage_sweep(holder, period_s):
            return
    except redis.RedisError as exc:
        log.warning("storage not swept: %s", exc)
        return

    def run() -> None:
        try:
            sweep_storage()
        except redis.RedisError as exc:  # a sweep stops at its first Redis error: nothing is removed unasked
            log.warning("storage not swept: %s", exc)
        except Exception:  # noqa: BLE001 - a file system error: the next period tries again
            log.exception("storage not swept")

    _storage_sweeper = threading.Thread(target=run, name="dealrec-storage-sweep", daemon=True)
    _storage_sweeper.start()


def sweep_stale_uploads(store: JobStore, files: Files, stale_s: float) -> None:
    """What an API that died mid-upload leaves, once unchanged for `stale_s`: partial files under tmp/,
    and a dataset record never handed to validation (worker/service/uploads.py)."""
    try:
        files.sweep_tmp(stale_s)
    except OSError as exc:
        log.warning("temporary folders not swept: %s", exc)
    try:
        sweep_abandoned(store, files, stale_s)
    except redis.RedisError as exc:
        log.warning("abandoned uploads not swept: %s", exc)
    except Exception:  # noqa: BLE001 - the heartbeat thread must go on (a dead one makes the worker look dead)
        log.exception("abandoned uploads not swept")


def requeue_stalled_jobs(store: JobStore, settings, holder: str) -> list[str]:
    """Send a task again for running jobs whose worker died (see JobStore.stalled_jobs): without this,
    such a job waits for the broker to restore its unacked message, i.e. the visibility timeout
    (hours), or forever if the message was acknowledged as failed while Redis was away. A duplicate
    message is harmless: the job lock and the recorded stages make the second one a no-op."""
    from worker.service.plan import next_segment, request_stages
    from worker.service.requests import PruneRequest

    if not store.claim_reaper(holder, settings.lock_ttl_s):
        return []
    requeued = []
    for job in store.stalled_jobs(idle_s=3 * settings.lock_ttl_s):
        # The job's own stage list (the runner's), fine-tuning stages included.
        stages = request_stages(PruneRequest.model_validate(job.request))
        queue, _ = next_segment(stages, job.completed_stages, settings)
        if queue is None:
            continue
        try:
            send(app, TASK_RUN, [job.id, queue], queue)
        except Exception as exc:  # noqa: BLE001 - broker away: the next period tries again
            log.warning("job %s: stalled, could not requeue (%s)", job.id, exc)
            continue
        unsent = job.handoff  # recorded by a task whose worker died before sending it
        store.update_job(job.id, allowed=["running"], handoff=queue, handoff_id=secrets.token_hex(8),
                         handoff_sent=True, attempts=job.attempts + (0 if unsent else 1))
        if unsent:
            store.add_event(job.id, "job handed on again: its worker stopped before sending it", level="warning",
                            requeued_by=holder, handoff=unsent, completed_stages=job.completed_stages)
        else:
            store.add_event(job.id, "job resumed after its worker stopped", level="warning", requeued_by=holder,
                            attempt=job.attempts + 1, completed_stages=job.completed_stages)
        log.warning("job %s: its worker stopped%s; requeued on %s", job.id,
                    " before sending its hand-off" if unsent else "", queue)
        requeued.append(job.id)
    return requeued


class _Heartbeat:
    """Marks this worker alive in the store. `/readyz` reads it: a solo-pool worker busy with a job
    cannot answer Celery's control.ping, yet it is there. The same thread looks for stalled jobs
    (one worker per period), for held jobs a dead process left unsent (worker/service/dispatch.py),
    sweeps what an API that died mid-upload left (every worker, cheap: a partial upload and a dataset
    record never handed to validation go within minutes, not at the next worker start), and once per
    DEALREC_STORAGE_SWEEP_S (one worker) removes the folders of expired jobs and deleted datasets."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.thread: threading.Thread | None = None
        self.queues: list[str] = []  # what this worker consumes, in its heartbeat (/readyz counts per queue)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="dealrec-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        settings = get_settings()
        store, files = _context()
        next_reap = time.monotonic() + settings.lock_ttl_s
        next_sweep = time.monotonic() + settings.tmp_sweep_period_s  # the worker swept at start
        next_storage_sweep = time.monotonic() + settings.storage_sweep_s
        while True:
            try:
                store.worker_alive(self.name, settings.worker_heartbeat_s * 3, self.queues)
                if time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + settings.lock_ttl_s
                    requeue_stalled_jobs(store, settings, self.name)
                    # Held or released jobs a dead process left unsent (every worker; each entry is claimed once).
                    recover_dispatch(store, _quotas(), app, settings.lock_ttl_s)
            except redis.RedisError as exc:
                log.warning("heartbeat not written: %s", exc)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + settings.tmp_sweep_period_s
                sweep_stale_uploads(store, files, settings.stale_upload_s)
            if time.monotonic() >= next_storage_sweep:
                next_storage_sweep = time.monotonic() + settings.storage_sweep_s
                sweep_storage_once(store, self.name, settings.storage_sweep_s)
            if self.stop.wait(settings.worker_heartbeat_s):
                break

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(redis.RedisError):
            _context()[0].worker_gone(self.name)


_heartbeat = _Heartbeat()


def _consumed_queues(consumer: object) -> list[str]:
    """The queue names a Celery worker consumes (its -Q), from the consumer `worker_ready` passes."""
    task_consumer = getattr(consumer, "task_consumer", None)
    return [q.name for q in getattr(task_consumer, "queues", None) or ()]


@worker_ready.connect
def _on_ready(sender: object = None, **_: object) -> None:
    settings = get_settings()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, as in the CLI
    os.environ.setdefault("DEALREC_CACHE_DIR", str(settings.cache_root))
    try:
        sweep_storage()
    except (redis.RedisError, OSError) as exc:
        log.warning("storage sweep skipped: %s", exc)
    # Import core now (torch, transformers) rather than inside the first job.
    import worker.runner  # noqa: F401
    # The heartbeat is what makes the worker count as live (/readyz, `dealrec worker`, the tests): it starts
    # only once the worker can take a task, not while it still imports torch for seconds.
    _heartbeat.queues = _consumed_queues(sender)
    _heartbeat.start()
    log.info("dealrec worker ready (data %s, cache %s)", settings.data_dir, settings.cache_root)


@worker_shutdown.connect
def _on_shutdown(**_: object) -> None:
    _heartbeat.close()
