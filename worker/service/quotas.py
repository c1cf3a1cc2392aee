"""Per-tenant quotas and fair dispatch between tenants, kept in Redis so that every API process and
every worker sees the same numbers; each check and its write are one Lua script (worker/service/lua.py).

Quotas (`Limits`, from the DEALREC_TENANT_* settings):
- jobs: a tenant's queued and running jobs are the members of `tenant:<t>:active`. A job joins it in
  the script that creates it and checks the limit (CREATE_JOB), and leaves it in the script that
  makes it succeeded, failed or cancelled (UPDATE_IF): the slot is the job's membership, not a
  counter that a crash between two writes could leave wrong. Unfinished jobs never expire.
- datasets and bytes: `tenant:<t>:storage` maps each of the tenant's datasets to the bytes of its
  stored files (ready, validating or invalid alike). CREATE_DATASET checks both limits and adds the
  dataset with its record; DELETE_DATASET removes it with its record. Job artifacts do not count:
  they are a fraction of their dataset's size and expire with their job.

Fair dispatch: at most `Limits.running` jobs of a tenant are handed to the workers (sent to the
broker and not finished) at once; its other jobs wait in `tenant:<t>:held`, a list in Redis,
oldest first, still `queued` to the client. Each tenant therefore has at most that many messages
in the broker's first-in-first-out queues, and another tenant's new job waits behind at most that
many of each tenant's jobs, never behind a whole burst. When one of the tenant's jobs ends, the
process that ended it releases the next held one (RELEASE), which joins the back of the queue:
tenants take turns.

Nothing is lost when a process dies. A job leaves a held list (or is created without being held)
into `dispatching` (a sorted set: job id -> milliseconds) in the same script, and leaves that set
once its message was sent (`dispatched`). The reaper (worker/dispatch.py, run by the workers' heartbeat)
sends again any entry older than its bounded wait (the process died between the two; a duplicate
message is harmless: the job lock and the recorded stages make it a no-op), and releases the held
jobs of every tenant with a free slot (a process died between ending a job and releasing the next).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from worker.service import lua
from worker.service.jobstore import JobStore, StoreError, _dump, event_json
from worker.service.records import DatasetRecord, JobRecord
from worker.service.uploads import unsent_key

# The variable that sets each per-tenant limit (named in every 429).
SETTING = {"jobs": "DEALREC_TENANT_MAX_JOBS", "datasets": "DEALREC_TENANT_MAX_DATASETS",
           "bytes": "DEALREC_TENANT_MAX_BYTES"}


@dataclass(frozen=True)
class Limits:
    """A tenant's limits; 0 = none (the store's own `create_job` / `create_dataset` use no limit)."""

    jobs: int = 0  # queued + running jobs, held ones included
    running: int = 0  # jobs handed to the workers at once; the others are held
    datasets: int = 0
    bytes: int = 0  # bytes of the datasets' stored files
    retry_after_s: int = 30

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(jobs=settings.tenant_max_jobs, running=settings.tenant_max_running,
                   datasets=settings.tenant_max_datasets, bytes=settings.tenant_max_bytes,
                   retry_after_s=settings.tenant_retry_after_s)


@dataclass(frozen=True)
class TenantUsage:
    """One tenant against its quotas: queued + running jobs (`active`, held ones included), those of
    them `held` for fair dispatch, its datasets and their stored bytes."""

    active: int
    held: int
    datasets: int
    bytes: int


class QuotaExceeded(Exception):
    """A tenant at one of its limits: which (`quota`: jobs, datasets or bytes), where it stands and
    the limit; the API answers 429 with Retry-After."""

    def __init__(self, quota: str, current: int, limit: int, retry_after_s: int, message: str,
                 **extra: Any) -> None:
        super().__init__(message)
        self.quota, self.current, self.limit, self.retry_after_s = quota, current, limit, retry_after_s
        self.message = message
        self.extra = extra

    def details(self) -> dict[str, Any]:
        return {"quota": self.quota, "current": self.current, "limit": self.limit, "setting": SETTING[self.quota],
                **self.extra}


@dataclass(frozen=True)
class Admission:
    """A job request's outcome: the job (new, or the earlier one of its Idempotency-Key), whether it
    was created now, whether it is held, and the jobs to hand to the broker now (itself unless held;
    older held jobs of the tenant if their release was missed): send each, then `dispatched(id)`."""

    job: JobRecord
    created: bool
    held: bool = False
    send: tuple[str, ...] = ()


def _now_ms() -> int:
    return int(time.time() * 1000)


class TenantQuotas:
    def __init__(self, store: JobStore, limits: Limits) -> None:
        self.store = store
        self.limits = limits
        self._create_job = store.r.register_script(lua.CREATE_JOB)
        self._release = store.r.register_script(lua.RELEASE)
        self._claim_stale = store.r.register_script(lua.CLAIM_STALE)
        self._create_dataset = store.r.register_script(lua.CREATE_DATASET)

    @classmethod
    def from_settings(cls, store: JobStore, settings: Any) -> TenantQuotas:
        return cls(store, Limits.from_settings(settings))

    def _key(self, tenant: str, kind: str) -> str:
        return self.store.key("tenant", tenant, kind)

    @property
    def _dispatching(self) -> str:
        return self.store.key("dispatching")

    # ---- jobs ---------------------------------------------------------------------------------
    def admit_job(self, rec: JobRecord, idempotency_key: str | None = None, request_hash: str = "",
                  announce: bool = False) -> Admission:
        """Create a queued job within the tenant's job limit (QuotaExceeded past it), or return the
        earlier job of the same Idempotency-Key (StoreError `idempotency_conflict` when its request
        differs); StoreError `not_found` / `dataset_not_ready` for the dataset. `announce`: write the
        job's first event ("job queued", saying whether it is held)."""
        s = self.store
        idem_key = s.idem_key(rec.tenant, idempotency_key) if idempotency_key else s.key("idem", "-")
        value = f"{rec.id} {request_hash}" if idempotency_key else ""
        first = held_event = ""
        if announce:
            first = event_json("job queued", queue=rec.queue)
            held_event = event_json(
                f"job queued; held until one of this tenant's {self.limits.running} jobs with the workers ends "
                f"(DEALREC_TENANT_MAX_RUNNING: the most it may have with them at once)", queue=rec.queue, held=True)
        res = self._create_job(
            keys=[s.job_key(rec.id), s.index_key(rec.tenant, "jobs"), s.dataset_key(rec.dataset_id),
                  s._dataset_jobs(rec.dataset_id), idem_key, s._metrics("jobs"), self._key(rec.tenant, "active"),
                  self._key(rec.tenant, "held"), self._dispatching, s._events(rec.id)],
            args=[rec.id, json.dumps(_dump(rec)), value, s.job_ttl_s, json.dumps(rec.tenant), self.limits.jobs,
                  self.limits.running, _now_ms(), first, held_event])
        status = res[0]
        if status == "existing":
            job_id, _, old_hash = res[1].partition(" ")
            if old_hash != request_hash:
                raise StoreError("idempotency_conflict",
                                 "this Idempotency-Key was used with a different request", job_id=job_id)
            old = s.get_job(job_id)
            if old is None:  # expired together with its job: the key is free again
                s.r.delete(idem_key)
                return self.admit_job(rec, idempotency_key, request_hash, announce)
            return Admission(old, False)
        if status == "no_dataset":
            raise StoreError("not_found", f"dataset {rec.dataset_id} not found")
        if status == "dataset_not_ready":
            raise StoreError("dataset_not_ready", f"dataset {rec.dataset_id} is {res[1]}, not ready",
                             dataset_status=res[1])
        if status == "over_limit":
            active = int(res[1])
            raise QuotaExceeded("jobs", active, self.limits.jobs, self.limits.retry_after_s,
                                f"this tenant has {active} queued or running jobs, its limit "
                                f"(DEALREC_TENANT_MAX_JOBS = {self.limits.jobs}); retry once one has finished")
        return Admission(rec, True, held=res[1] == "1", send=tuple(res[2:]))

    def release(self, tenant: str) -> list[str]:
        """Move the tenant's next held jobs, as many as its free slots, to `dispatching`; returns
        their ids, for the caller to send (then `dispatched`)."""
        return list(self._release(keys=[self._key(tenant, "active"), self._key(tenant, "held"), self._dispatching],
                                  args=[self.limits.running, _now_ms()]))

    def dispatched(self, job_ids: Iterable[str]) -> None:
        """Their messages reached the broker: nothing for the reaper to send again."""
        ids = list(job_ids)
        if ids:
            self.store.r.zrem(self._dispatching, *ids)

    def claim_stale(self, older_than_s: float, limit: int = 100) -> list[str]:
        """Jobs moved to `dispatching` more than `older_than_s` ago and not confirmed sent since,
        each stamped now so that the next claim does not return it again for as long."""
        now = _now_ms()
        return list(self._claim_stale(keys=[self._dispatching], args=[now - int(older_than_s * 1000), now, limit]))

    def held_positions(self, tenant: str, job_ids: Iterable[str]) -> dict[str, int]:
        """Each of these jobs' place in its tenant's held list, 1 = the next one handed to the workers
        when one of the tenant's running jobs ends; a job not held is left out. One LRANGE of a list no
        longer than DEALREC_TENANT_MAX_JOBS (any Redis version; LPOS would need 6.0.6)."""
        ids = set(job_ids)
        if not ids:
            return {}
        line = self.store.r.lrange(self._key(tenant, "held"), 0, -1)
        return {job_id: place for place, job_id in enumerate(line, start=1) if job_id in ids}

    def tenants_waiting(self) -> list[str]:
        """Tenants with held jobs (Redis removes an emptied list, so every held list found has some)."""
        head, tail = self.store.key("tenant", ""), ":held"
        return [k[len(head):-len(tail)] for k in self.store.r.scan_iter(match=self._key("*", "held"), count=200)]

    def usage(self, tenants: Iterable[str]) -> dict[str, TenantUsage]:
        """Where each tenant stands against its quotas, read in one round trip from what the quotas keep
        (its active set, held list and stored-bytes hash): O(its datasets), never a scan or a read per job."""
        names = list(tenants)
        with self.store.r.pipeline(transaction=False) as p:
            for t in names:
                p.scard(self._key(t, "active"))
                p.llen(self._key(t, "held"))
                p.hvals(self._key(t, "storage"))
            raw = p.execute()
        return {t: TenantUsage(active=int(raw[3 * i]), held=int(raw[3 * i + 1]), datasets=len(raw[3 * i + 2]),
                               bytes=sum(int(v) for v in raw[3 * i + 2])) for i, t in enumerate(names)}

    def job_usage(self, tenant: str) -> dict[str, int]:
        """{"active": queued + running jobs, "held": those of them held}."""
        with self.store.r.pipeline(transaction=False) as p:
            p.scard(self._key(tenant, "active"))
            p.llen(self._key(tenant, "held"))
            active, held = p.execute()
        return {"active": int(active), "held": int(held)}

    # ---- datasets -----------------------------------------------------------------------------
    def storage(self, tenant: str) -> tuple[int, int]:
        """(datasets, bytes of their stored files) of the tenant."""
        sizes = self.store.r.hvals(self._key(tenant, "storage"))
        return len(sizes), sum(int(v) for v in sizes)

    def check_storage(self, tenant: str) -> None:
        """Refuse at once (before an upload is read) a tenant already at its dataset count or bytes.
        Only a first look: `admit_dataset` checks again, atomically, with the upload's own size."""
        count, stored = self.storage(tenant)
        if self.limits.datasets and count >= self.limits.datasets:
            raise self._over_datasets(count)
        if self.limits.bytes and stored >= self.limits.bytes:
            raise self._over_bytes(stored, 0)

    def admit_dataset(self, rec: DatasetRecord) -> None:
        """Record a new dataset within the tenant's dataset count and stored bytes (its files' sizes);
        a `validating` one also enters the set of records whose validation task is not sent yet
        (worker/service/uploads.py: the caller sends it, then `validation_sent`)."""
        size = sum(f.bytes for f in rec.files)
        s = self.store
        # A record to validate waits in the unsent set until its task is sent (worker/service/uploads.py).
        since = _now_ms() if rec.status == "validating" else ""
        status, value = self._create_dataset(
            keys=[s.dataset_key(rec.id), s.index_key(rec.tenant, "datasets"), self._key(rec.tenant, "storage"),
                  unsent_key(s)],
            args=[rec.id, json.dumps(_dump(rec)), size, self.limits.datasets, self.limits.bytes, since])
        if status == "datasets":
            raise self._over_datasets(int(value))
        if status == "bytes":
            raise self._over_bytes(int(value), size)

    def _over_datasets(self, count: int) -> QuotaExceeded:
        return QuotaExceeded("datasets", count, self.limits.datasets, self.limits.retry_after_s,
                             f"this tenant keeps {count} datasets, its limit (DEALREC_TENANT_MAX_DATASETS = "
                             f"{self.limits.datasets}); delete one to add another")

    def _over_bytes(self, stored: int, incoming: int) -> QuotaExceeded:
        limit = f"its limit of {self.limits.bytes} (DEALREC_TENANT_MAX_BYTES)"
        where = f"and this upload's {incoming} more would pass {limit}" if incoming else f"{limit} reached"
        return QuotaExceeded("bytes", stored, self.limits.bytes, self.limits.retry_after_s,
                             f"this tenant's datasets take {stored} bytes {where}; delete a dataset to add another",
                             requested=incoming or None)
