"""A dataset between its record and its validation task, and the records an API left behind there.

An upload is recorded first (`validating`, its bytes counted in the tenant's quotas: quotas.py), then
its files are moved into place, then its validation task is sent (app/routes/datasets.py `_register`).
An API that dies between the first step and the last (killed, out of memory, its host gone) leaves a
record that no task will ever validate: `validating` forever, and counted against the tenant's dataset
and byte quotas forever. So the script that creates a `validating` record also puts it in
`datasets:unsent` (a sorted set: id -> when, in ms), and it leaves the set once its task is sent
(`validation_sent`: by the API right after sending it, and by the validation task as it starts, in
case the API died between the two).

The workers' periodic sweep (`sweep_abandoned`, with the one of stale temporary folders) marks a record
still in the set after DEALREC_STALE_UPLOAD_S `invalid` with the error `upload_abandoned`, frees its
share of the quotas, removes its files, and lets the record expire after DEALREC_JOB_TTL_S: a client that
polls or lists it reads why (its upload never got an answer: the API died before its 202). The check and
the change are one script, and it leaves alone a record that is no longer `validating` or whose
validation runs (a deliveries count, worker/deliveries.py). A record whose task was sent is never
swept however long it waits in the queue or its validation takes (DEALREC_VALIDATE_TIME_LIMIT_S): the
broker delivers that task at least once, and the validation ends it `ready` or `invalid`.
"""

from __future__ import annotations

import json
import logging
import time

from worker.service import lua
from worker.service.files import Files
from worker.service.jobstore import JobStore, _encode
from worker.service.records import utcnow

log = logging.getLogger(__name__)

ABANDONED_CODE = "upload_abandoned"
ABANDONED_MESSAGE = ("the upload was recorded but never handed to validation (the API stopped while storing it, "
                     "before it answered); upload the files again")


def unsent_key(store: JobStore) -> str:
    """The sorted set of dataset records whose validation task has not been sent: id -> ms recorded."""
    return store.key("datasets", "unsent")


def validation_work(dataset_id: str) -> str:
    """The deliveries name of a dataset's validation (worker/deliveries.py counts its runs by it)."""
    return f"dataset:{dataset_id}:validate"


def validation_sent(store: JobStore, dataset_id: str) -> None:
    """The dataset's validation task is with the broker (or running): nothing for the sweep to do."""
    store.r.zrem(unsent_key(store), dataset_id)


def sweep_abandoned(store: JobStore, files: Files, stale_s: float, limit: int = 100) -> list[str]:
    """Mark invalid (`upload_abandoned`) the records left in the unsent set for more than `stale_s`
    seconds with no validation running, free their quota share and remove their files; returns their ids."""
    cutoff = int((time.time() - stale_s) * 1000)
    script = store.r.register_script(lua.ABANDON_UPLOAD)
    fields = json.dumps(_encode({"status": "invalid", "validated_at": utcnow().isoformat(),
                                 "errors": [{"code": ABANDONED_CODE, "message": ABANDONED_MESSAGE}]}))
    abandoned = []
    for dataset_id in store.r.zrangebyscore(unsent_key(store), "-inf", cutoff, start=0, num=limit):
        tenant = json.loads(store.r.hget(store.dataset_key(dataset_id), "tenant") or "null")
        outcome = script(keys=[store.dataset_key(dataset_id), unsent_key(store),
                               store.key("deliveries", validation_work(dataset_id)),
                               store.key("tenant", tenant or "-", "storage")],
                         args=[dataset_id, cutoff, fields, store.job_ttl_s])
        if outcome != "abandoned":
            continue
        files.remove(files.dataset_dir(dataset_id))
        log.warning("dataset %s of tenant %s: left validating by an API that stopped before sending its "
                    "validation; marked invalid (%s), its quota freed", dataset_id, tenant, ABANDONED_CODE)
        abandoned.append(dataset_id)
    return abandoned
