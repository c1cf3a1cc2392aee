"""Deliveries of one piece of work counted in the store, so that work which kills its worker is
parked instead of redelivered forever.

Delivery is at-least-once (`acks_late`, `task_reject_on_worker_lost`, and the reaper that requeues
a stalled job): a task whose worker dies comes back to the next worker. That is right for a worker
killed by something else, and wrong for work that kills every worker that runs it (an input that
exhausts memory, a crash in native code). Each run of such work (a job's segment of stages, one
effort shard, one dataset validation) increments a counter in the store when it starts and clears
it when it ends, whatever the outcome; only a run whose process died leaves its count behind. A run
that finds more than CRASH_LIMIT runs before it without an end does not run: the job (dataset
validation) is marked failed (invalid) with a short error, and the message is acknowledged.

The count is cleared at the end only if the store answers then: a run that ends while Redis is away
counts as one that stopped (it would take CRASH_LIMIT such runs of the same work to park it)."""

from __future__ import annotations

import contextlib
import logging

import redis

from worker.service.jobstore import JobStore

log = logging.getLogger(__name__)

CRASH_LIMIT = 2  # runs of the same work whose worker died; the next delivery is parked
PARKED_CODE = "worker_lost"
PARKED_JOB = "the worker running this job stopped twice; parked"
PARKED_DATASET = "the worker validating this dataset stopped twice; parked"


class Delivery:
    """`with Delivery(store, "job:<id>:<stage>") as d:` counts this run; `d.parked` says it must
    not run. The count is cleared on leaving the block (an exception included), so only a run
    whose process died is left counted."""

    def __init__(self, store: JobStore, what: str) -> None:
        self.store = store
        self.what = what
        self.runs = 0

    def __enter__(self) -> Delivery:
        self.runs = self.store.begin_delivery(self.what)
        if self.parked:
            log.error("%s: %d runs before this one stopped without ending; parked", self.what, self.runs - 1)
        elif self.runs > 1:
            log.warning("%s: run %d (%d before it stopped without ending)", self.what, self.runs, self.runs - 1)
        return self

    @property
    def parked(self) -> bool:
        return self.runs > CRASH_LIMIT

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(redis.RedisError):
            self.store.end_delivery(self.what)
