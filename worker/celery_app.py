"""The Celery application: Redis broker and result backend, queues `cpu` and `gpu`.

Delivery is at-least-once on purpose: a message is acknowledged only after its task returns
(`acks_late`) and is requeued if the worker dies, so a killed worker's job runs again elsewhere.
The job lock in the store (renewed by the running worker) keeps a redelivered message from
starting a second copy of a job that is still running.

Celery's result backend holds no job state and nothing reads it: every task but the effort shard
ignores its result, errors included (an exception's message, possibly echoing a huge input, never
reaches Redis), and tasks are sent with `ignore_result=True` (`send`), so that the sender does not
subscribe to a result channel it never reads. The shards of a chord keep theirs (the chord counts
them); their task never raises anything but a short error (worker/tasks.py)."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from worker.service.settings import Settings, get_settings

QUEUES = ("cpu", "gpu")
TASK_VALIDATE = "worker.tasks.validate_dataset"
TASK_RUN = "worker.tasks.run_job"  # args: job id, queue; sent to that queue
TASK_SWEEP = "worker.tasks.sweep_storage"
TASK_EFFORT_SHARD = "worker.tasks.effort_shard"  # args: job id, shard index; sent to the LLM queue


def send(app: Celery, name: str, args: list, queue: str) -> None:
    """Send a task whose result nobody waits for (every task of the service is one)."""
    app.send_task(name, args=args, queue=queue, ignore_result=True)


def make_celery(settings: Settings) -> Celery:
    app = Celery("dealrec", broker=settings.broker, backend=settings.backend, include=["worker.tasks"])
    transport = {
        # Redis redelivers an unacked message after this many seconds: longer than the longest task.
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": settings.unacked_restore_interval_s,
        "unacked_restore_throttle": settings.unacked_restore_throttle,
        "global_keyprefix": settings.key_prefix,  # one prefix owns every key, Celery's included
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
    }
    app.conf.update(
        task_queues=[Queue(q, routing_key=q) for q in QUEUES],
        task_default_queue="cpu",
        task_routes={TASK_VALIDATE: {"queue": "cpu"}, TASK_SWEEP: {"queue": "cpu"}},  # TASK_RUN: queue given per send
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a long job must not hold a second message hostage
        task_time_limit=settings.task_time_limit_s + 60,  # enforced by prefork; the runner also checks its deadline
        task_soft_time_limit=settings.task_time_limit_s,
        broker_transport_options=transport,
        result_backend_transport_options={"global_keyprefix": settings.key_prefix},
        result_expires=settings.job_ttl_s,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        # Publishing while Redis is down should fail fast (the API answers 503), not hang.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_track_started=False,  # job state lives in the store, not in Celery's backend
        # Nothing reads Celery's results: they are not stored, an exception's message included (the
        # effort shards, a chord's header, override this for themselves).
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        result_extended=False,  # a stored result (a shard's) never carries the task's arguments
        enable_utc=True,
    )
    return app


# `celery -A worker.celery_app worker` finds this; it reads the DEALREC_* environment once.
app = make_celery(get_settings())
celery_app = app
