"""Turns core's progress and cancel callbacks into job-store writes and reads, cheaply.

Core calls `progress(stage, fraction, message)` once per batch, which can be hundreds of times a
second; the store gets at most one progress write per `interval_s`, one event per stage start and
end, and one per tenth of a stage. The cancel callback reads the job's cancel flag at most every
`poll_s`, so a cancel is honoured within one batch plus that."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from core.progress import stage_phases
from worker.service.jobstore import JobStore

log = logging.getLogger(__name__)


class JobReporter:
    def __init__(self, store: JobStore, job_id: str, stages: list[str], completed: list[str],
                 interval_s: float = 0.5) -> None:
        self.store = store
        self.job_id = job_id
        self.stages = stages  # the stages this job's method runs, in order
        self.phases = stage_phases(stages)  # core's stage weights: one fraction for the whole job
        self.completed = list(completed)
        self.interval_s = interval_s
        self.current: str | None = None
        self._started = 0.0
        self._last_write = 0.0
        self._decile = -1
        self._lock = threading.Lock()

    def overall(self, stage: str, frac: float) -> float:
        return self.phases.fraction(stage, frac)

    def __call__(self, stage: str, frac: float, msg: str = "") -> None:
        """core's ProgressFn. JobStore errors are logged, never raised: progress must not kill a job."""
        with self._lock:
            try:
                self._report(stage, frac, msg)
            except redis.RedisError as exc:
                log.warning("job %s: progress not recorded (%s)", self.job_id, exc)

    def _report(self, stage: str, frac: float, msg: str) -> None:
        now = time.monotonic()
        if stage != self.current:
            self.current, self._started, self._decile = stage, now, -1
            self.store.add_event(self.job_id, f"stage {stage} started", stage=stage)
            self._write(stage, frac, now)
        elif now - self._last_write >= self.interval_s or frac >= 1.0:
            self._write(stage, frac, now)
        decile = int(max(0.0, min(frac, 1.0)) * 10)
        if decile > self._decile and decile > 0:
            self._decile = decile
            self.store.add_event(self.job_id, msg or f"{stage} {decile * 10}%", level="debug", stage=stage,
                                 fraction=round(frac, 4), progress=round(self.overall(stage, frac), 4))

    def _write(self, stage: str, frac: float, now: float) -> None:
        self._last_write = now
        self.store.update_job(self.job_id, allowed=["running"], stage=stage,
                              progress=round(self.overall(stage, frac), 4))

    def complete(self, stage: str, seconds: float) -> None:
        """The stage's artifact is saved (the caller records the completion in the job)."""
        with self._lock:
            if stage not in self.completed:
                self.completed.append(stage)
            if self.current == stage:
                self.current = None
            try:
                self.store.add_event(self.job_id, f"stage {stage} finished", stage=stage, seconds=round(seconds, 3))
            except redis.RedisError as exc:
                log.warning("job %s: stage end not recorded (%s)", self.job_id, exc)


class CancelCheck:
    """core's CancelFn: True when the client cancelled, the worker lost the job's lock, or the job
    ran past its time limit. `reason` says which. `blocking` is what core calls around a stretch
    that cannot poll it (core.progress.uninterruptible: loading the LLM)."""

    def __init__(self, store: JobStore, job_id: str, lost: threading.Event, deadline: float,
                 poll_s: float = 0.25) -> None:
        self.store = store
        self.job_id = job_id
        self.lost = lost
        self.deadline = deadline
        self.poll_s = poll_s
        self.reason: str | None = None
        self._next_poll = 0.0

    def __call__(self) -> bool:
        if self.reason:
            return True
        if self.lost.is_set():
            self.reason = "lock_lost"
        elif time.monotonic() > self.deadline:
            self.reason = "time_limit"
        elif time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_s
            try:
                if self.store.cancel_requested(self.job_id):
                    self.reason = "cancelled"
            except redis.RedisError as exc:  # cannot see the flag now; look again next batch
                log.warning("job %s: cancel flag unreadable (%s)", self.job_id, exc)
        return self.reason is not None

    @contextmanager
    def blocking(self, what: str) -> Iterator[None]:
        """core runs something that cannot look at the cancel flag until it ends (`what`: "loading the
        LLM"). The job says so in the store (`blocked`) meanwhile, so that a cancel arriving now ends
        the job at once (JobStore.cancel_if_blocked, called by the API) instead of waiting for the
        load; afterwards the flag is read again at once, and core stops before its first batch."""
        self._mark(what)
        try:
            yield
        finally:
            self._next_poll = 0.0
            self._mark(None)

    def _mark(self, what: str | None) -> None:
        try:
            self.store.update_job(self.job_id, allowed=["running"], blocked=what)
        except redis.RedisError as exc:  # a cancel then waits for the load, as it did before
            log.warning("job %s: could not record %r (%s)", self.job_id, what, exc)
