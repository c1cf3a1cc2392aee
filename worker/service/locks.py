"""The job lock: which worker runs a job, renewed by a heartbeat while it does."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:  # the store creates locks; a lock only calls back into it
    from worker.service.jobstore import JobStore

log = logging.getLogger(__name__)


class JobLock:
    """Who runs a job. Taken with SET NX PX; a heartbeat thread renews it every ttl/3 while the
    worker runs, so it outlives any stage, yet frees itself within `ttl` of a worker's death."""

    def __init__(self, store: JobStore, key: str, ttl_s: float) -> None:
        self.store = store
        self.key = key
        self.ttl_ms = int(ttl_s * 1000)
        self.token = secrets.token_hex(8)
        self.lost = threading.Event()  # set when the lock could not be renewed: stop working

    def acquire(self) -> bool:
        return bool(self.store.r.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def remaining_s(self) -> float:
        ms = self.store.r.pttl(self.key)
        return max(ms, 0) / 1000.0

    def renew(self) -> bool:
        return bool(self.store._renew_lock(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> None:
        try:
            self.store._release_lock(keys=[self.key], args=[self.token])
        except redis.RedisError as exc:  # it expires by itself
            log.warning("could not release %s: %s", self.key, exc)

    @contextmanager
    def keepalive(self) -> Iterator[JobLock]:
        stop = threading.Event()
        interval = self.ttl_ms / 3000.0

        def beat() -> None:
            last_ok = time.monotonic()
            while not stop.wait(interval):
                try:
                    if self.renew():
                        last_ok = time.monotonic()
                        continue
                    log.error("lock %s was taken over or expired: abandoning the job", self.key)
                    self.lost.set()
                    return
                except redis.RedisError as exc:
                    # Redis away for a moment: keep trying until the lock would have expired.
                    log.warning("lock %s not renewed (%s)", self.key, exc)
                    if (time.monotonic() - last_ok) * 1000 > self.ttl_ms:
                        self.lost.set()
                        return

        thread = threading.Thread(target=beat, name=f"lock-{self.key}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.release()
