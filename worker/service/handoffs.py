"""Hand-offs between a job's tasks, and the gap between recording one and sending its task.

A task that ends with stages left records the hand-off (`handoff` = the next queue, or the effort
shards), releases the job's lock and only then sends the next task (or the shard chord). A worker that
dies in between leaves a running job that no worker holds and no queue carries; its own message comes
back only after the broker's visibility timeout (hours). So each hand-off gets a token, and the task
marks it sent once the broker took the message: the reaper (`JobStore.stalled_jobs`) treats a hand-off
recorded but never marked sent, idle past its bounded wait, like a job whose worker died, and sends
it again. A duplicate is harmless: the job lock and the recorded stages make the second a no-op.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from typing import Any

import redis

from worker.service.jobstore import JobStore


def record_handoff(store: JobStore, job_id: str, to: str, *, allowed: Iterable[str], **fields: Any) -> str:
    """Record that the job goes on at `to` (a queue, or the effort shards), not sent yet; returns
    the hand-off's token for `confirm_handoff`."""
    token = secrets.token_hex(8)
    store.update_job(job_id, allowed=allowed, handoff=to, handoff_id=token, handoff_sent=False, **fields)
    return token


def confirm_handoff(store: JobStore, job_id: str, token: str | None) -> bool:
    """Mark the hand-off `token` sent, unless the job has moved on since (another hand-off, or the
    next task already started and cleared it): then nothing is written. True when marked."""
    if not token:
        return False
    key = store.job_key(job_id)
    with store.r.pipeline() as pipe:
        try:
            pipe.watch(key)
            if pipe.hget(key, "handoff_id") != json.dumps(token):
                return False
            pipe.multi()
            pipe.hset(key, "handoff_sent", "true")
            pipe.execute()
            return True
        except redis.WatchError:  # the record changed between the read and the write: it moved on
            return False
