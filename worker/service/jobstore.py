"""The job store: the one module that knows every Redis key the service uses.

Layout (all under the configurable prefix, default `dealrec:`):

    dataset:<id>             hash, one JSON-encoded value per DatasetRecord field
    dataset:<id>:jobs        set of the unfinished jobs that read the dataset (deletion is refused while non-empty)
    job:<id>                 hash, one JSON-encoded value per JobRecord field
    job:<id>:events          list of JSON events; event id n is list index n - 1
    job:<id>:lock            the worker that runs the job (token), with a TTL its heartbeat renews
    tenant:<t>:datasets      sorted set (all scores 0) of dataset ids: ids sort by creation time
    tenant:<t>:jobs          sorted set (all scores 0) of job ids, the same way
    tenant:<t>:active        set of the tenant's queued and running jobs (its job quota; quotas.py)
    tenant:<t>:held          list of its queued jobs not yet handed to the broker (fair dispatch)
    tenant:<t>:storage       hash: dataset id -> bytes of its stored files (dataset and byte quotas)
    dispatching              sorted set: job id -> when (ms) it was released to the broker; left once its task is sent
    datasets:unsent          sorted set: dataset id -> when (ms) recorded, until its validation is sent (uploads.py)
    idem:<t>:<sha256(key)>   "<job id> <request hash>" for an Idempotency-Key
    metrics:jobs             hash: current queued/running counts, cumulative finished counts
    metrics:stage_seconds    hash: stage -> summed seconds;  metrics:stage_count: stage -> runs
    worker:<hostname>        a worker's liveness key, renewed while it runs
    reaper                   held for one period by the worker that looks for stalled jobs
    deliveries:<work>        runs of a piece of work started and not ended (worker/deliveries.py):
                             <work> = job:<id>:<stage> | shard:<job id>:<round>:<index> | dataset:<id>:validate

Celery's own broker/backend keys carry the same prefix (kombu's `global_keyprefix`), so one prefix
owns everything. Every read-modify-write is one Lua script, so two processes never interleave.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import redis
from pydantic import BaseModel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from core.data.errors import clip
from worker.service import lua
from worker.service.locks import JobLock
from worker.service.records import TERMINAL, TRANSITIONS, DatasetRecord, JobEvent, JobRecord, utcnow

log = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)

# Ids sort lexicographically by creation time (fixed-width hex milliseconds first), so a sorted set
# with equal scores pages through them newest-first with ZREVRANGEBYLEX, and cursors stay valid
# while new records arrive.
ID_KINDS = ("ds", "job")


def new_id(kind: str) -> str:
    assert kind in ID_KINDS
    return f"{kind}_{int(time.time() * 1000):012x}{secrets.token_hex(5)}"


def id_pattern(kind: str) -> str:
    """The shape of new_id's ids (12 hex digits of milliseconds, 10 random ones), as a regular expression."""
    return f"^{kind}_[0-9a-f]{{22}}$"


def is_valid_id(kind: str, value: str) -> bool:
    """Ids become Redis keys and folder names: only our own exact shape is accepted."""
    return re.fullmatch(id_pattern(kind), value) is not None  # fullmatch: no trailing newline either


# The largest event id a client may name (`after`): JSON-safe, and far below Redis's 64-bit list indices.
MAX_EVENT_ID = 2**53

class StoreError(Exception):
    """A store operation refused for a reason the caller reports (missing record, bad transition)."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


def connect(url: str) -> redis.Redis:
    # Short timeouts and few retries: the API answers 503 quickly while Redis is down, and the
    # pool reconnects by itself once it is back.
    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2, socket_timeout=10,
                                health_check_interval=15, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2))


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(capped_errors(k, v), separators=(",", ":"), default=str) for k, v in fields.items()}


# A job's or dataset's stored errors: at most this many, each text in them clipped (core.data.errors.clip).
MAX_STORED_ERRORS = 20


def capped_errors(key: str, value: Any) -> Any:
    """`error` / `errors` fields as they are stored: every text clipped, at most MAX_STORED_ERRORS, so
    that no input can make a record (and the responses that show it) large."""
    if key == "error" and isinstance(value, dict):
        return _clipped(value)
    if key == "errors" and isinstance(value, list):
        return [_clipped(e) if isinstance(e, dict) else e for e in value[:MAX_STORED_ERRORS]]
    return value


def _clipped(error: dict[str, Any]) -> dict[str, Any]:
    return {k: clip(v) if isinstance(v, str) else v for k, v in error.items()}


def event_json(message: str, level: str = "info", **data: Any) -> str:
    """A job event as stored, without its id (the script that appends it adds the id)."""
    return json.dumps({"created_at": utcnow().isoformat(), "level": level, "message": clip(message), "data": data},
                      separators=(",", ":"), default=str)


def _dump(model: BaseModel) -> dict[str, str]:
    return _encode(model.model_dump(mode="json"))


def _load(cls: type[R], raw: dict[str, str]) -> R | None:
    if not raw:
        return None
    return cls.model_validate({k: json.loads(v) for k, v in raw.items()})


class JobStore:
    """Datasets, jobs, events, idempotency keys, job locks and metrics in Redis."""

    def __init__(self, client: redis.Redis, prefix: str = "dealrec:", job_ttl_s: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.prefix = prefix
        self.job_ttl_s = job_ttl_s
        self._update_if = client.register_script(lua.UPDATE_IF)
        self._delete_dataset = client.register_script(lua.DELETE_DATASET)
        self._append_event = client.register_script(lua.APPEND_EVENT)
        self._renew_lock = client.register_script(lua.RENEW_LOCK)
        self._release_lock = client.register_script(lua.RELEASE_LOCK)

    @classmethod
    def from_settings(cls, settings) -> JobStore:
        return cls(connect(settings.redis_url), settings.key_prefix, settings.job_ttl_s)

    # ---- keys ---------------------------------------------------------------------------------
    # Public where the modules beside this one (quotas, handoffs, uploads) name them in their own
    # scripts and transactions; the rest stay this class's own.
    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def dataset_key(self, dataset_id: str) -> str:
        return self.key("dataset", dataset_id)

    def _dataset_jobs(self, dataset_id: str) -> str:
        return self.key("dataset", dataset_id, "jobs")

    def job_key(self, job_id: str) -> str:
        return self.key("job", job_id)

    def _events(self, job_id: str) -> str:
        return self.key("job", job_id, "events")

    def _lock(self, job_id: str) -> str:
        return self.key("job", job_id, "lock")

    def index_key(self, tenant: str, kind: str) -> str:
        return self.key("tenant", tenant, kind)

    def idem_key(self, tenant: str, client_key: str) -> str:
        return self.key("idem", tenant, hashlib.sha256(client_key.encode()).hexdigest())

    def _metrics(self, name: str) -> str:
        return self.key("metrics", name)

    def ping(self) -> bool:
        return bool(self.r.ping())

    # ---- datasets -----------------------------------------------------------------------------
    def create_dataset(self, rec: DatasetRecord) -> None:
        """Record a dataset with no limit (the API goes through quotas.TenantQuotas.admit_dataset)."""
        from worker.service.quotas import Limits, TenantQuotas  # it builds on this module

        TenantQuotas(self, Limits()).admit_dataset(rec)

    def get_dataset(self, dataset_id: str, tenant: str | None = None) -> DatasetRecord | None:
        rec = _load(DatasetRecord, self.r.hgetall(self.dataset_key(dataset_id)))
        return rec if rec is not None and (tenant is None or rec.tenant == tenant) else None

    def update_dataset(self, dataset_id: str, *, allowed: Iterable[str] = (), status: str = "",
                       **fields: Any) -> bool:
        """Set fields (and status) if the dataset's status is in `allowed` (empty: any)."""
        res, _ = self._update_if(keys=[self.dataset_key(dataset_id), self._metrics("datasets"), "", ""],
                                 args=[json.dumps(list(allowed)), status, json.dumps(_encode(fields)), 0, "", "0"])
        return res == "ok"

    def delete_dataset(self, tenant: str, dataset_id: str) -> str:
        """'deleted', 'busy' (a job uses it) or 'missing'."""
        return self._delete_dataset(keys=[self.dataset_key(dataset_id), self._dataset_jobs(dataset_id),
                                          self.index_key(tenant, "datasets"), self.index_key(tenant, "storage")],
                                    args=[dataset_id, json.dumps(tenant)])

    def list_datasets(self, tenant: str, cursor: str | None = None, limit: int = 50
                      ) -> tuple[list[DatasetRecord], str | None]:
        return self._page(self.index_key(tenant, "datasets"), DatasetRecord, self.dataset_key, cursor, limit, None)

    # ---- jobs ---------------------------------------------------------------------------------
    def create_job(self, rec: JobRecord, idempotency_key: str | None = None, request_hash: str = ""
                   ) -> tuple[JobRecord, bool]:
        """A queued job with no limit (the API goes through quotas.TenantQuotas.admit_job); returns
        (job, created), or the earlier job of this tenant's idempotency key (created False), or raises
        `idempotency_conflict` when the earlier request differs. The caller sends its task."""
        from worker.service.quotas import Limits, TenantQuotas  # it builds on this module

        admission = TenantQuotas(self, Limits()).admit_job(rec, idempotency_key, request_hash)
        return admission.job, admission.created

    def get_job(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        rec = _load(JobRecord, self.r.hgetall(self.job_key(job_id)))
        return rec if rec is not None and (tenant is None or rec.tenant == tenant) else None

    def list_jobs(self, tenant: str, status: str | None = None, cursor: str | None = None, limit: int = 50
                  ) -> tuple[list[JobRecord], str | None]:
        return self._page(self.index_key(tenant, "jobs"), JobRecord, self.job_key, cursor, limit, status)

    def update_job(self, job_id: str, *, allowed: Iterable[str], **fields: Any) -> bool:
        """Write fields only while the job's status is in `allowed`, so a worker that lost its job
        (cancelled, or taken over) cannot overwrite what happened since."""
        fields.setdefault("updated_at", utcnow().isoformat())
        res, _ = self._update_if(keys=[self.job_key(job_id), self._metrics("jobs"), "", ""],
                                 args=[json.dumps(list(allowed)), "", json.dumps(_encode(fields)), 0, "", "0"])
        return res == "ok"

    def transition(self, job_id: str, new: str, *, only_from: Iterable[str] | None = None, require: str = "",
                   **fields: Any) -> str:
        """Checked status change (see models.TRANSITIONS, narrowed by `only_from`); returns the
        previous status. Raises StoreError('invalid_transition') when not allowed, ('not_found')
        when the job is gone. A job reaching a terminal status starts its expiry clock and frees its dataset.
        `require`: a field of the job that must be set (not null), checked in the same script."""
        allowed = [s for s, targets in TRANSITIONS.items() if new in targets]
        if only_from is not None:
            allowed = [s for s in allowed if s in set(only_from)]
        now = utcnow().isoformat()
        fields.setdefault("updated_at", now)
        if new in TERMINAL:
            fields.setdefault("finished_at", now)
        dataset_id, tenant = (json.loads(v or "null")
                              for v in self.r.hmget(self.job_key(job_id), "dataset_id", "tenant"))
        terminal = new in TERMINAL
        res, prev = self._update_if(  # a terminal job also leaves its tenant's quota (quotas.py)
            keys=[self.job_key(job_id), self._metrics("jobs"),
                  self._dataset_jobs(dataset_id) if dataset_id else self.key("none"), self._events(job_id),
                  self.index_key(tenant or "-", "active"), self.index_key(tenant or "-", "held")],
            args=[json.dumps(allowed), new, json.dumps(_encode(fields)), self.job_ttl_s if terminal else 0,
                  job_id if terminal else "", "1", require])
        if res == "missing":
            raise StoreError("not_found", f"job {job_id} not found")
        if res == "refused":
            raise StoreError("invalid_transition", f"job {job_id} is {prev}; it cannot become {new}", status=prev)
        return prev

    def request_cancel(self, job_id: str) -> str:
        """Cancel: a queued job becomes cancelled at once; a running one gets its cancel flag, which
        its worker polls between batches. Returns the status the job had."""
        try:
            return self.transition(job_id, "cancelled", only_from=["queued"],
                                   error={"code": "cancelled", "message": "cancelled by request"})
        except StoreError as exc:
            if exc.code != "invalid_transition" or exc.extra.get("status") != "running":
                raise
        # Running (or it just started): flag it. update_job refuses if it finished meanwhile.
        if self.update_job(job_id, allowed=["running"], cancel_requested=True):
            return "running"
        job = self.get_job(job_id)
        if job is None:
            raise StoreError("not_found", f"job {job_id} not found")
        if job.status == "queued":  # went back? cannot happen today, but never leave it uncancelled
            return self.request_cancel(job_id)
        raise StoreError("invalid_transition", f"job {job_id} is already {job.status}", status=job.status)

    def cancel_if_waiting(self, job_id: str, lock_ttl_s: float) -> bool:
        """Cancel at once a running job that waits in a queue between two of its tasks (handed off,
        no worker holds it): there is no batch to wait for. Holding the job's lock while deciding
        keeps a worker from starting it meanwhile; the queued task then finds it cancelled."""
        lock = self.job_lock(job_id, lock_ttl_s)
        if not lock.acquire():
            return False
        try:
            job = self.get_job(job_id)
            if job is None or job.status != "running" or not job.handoff:
                return False
            self.transition(job_id, "cancelled", only_from=["running"], stage=None, handoff=None,
                            error={"code": "cancelled", "message": "cancelled by request"})
            return True
        finally:
            lock.release()

    def cancel_if_blocked(self, job_id: str) -> bool:
        """Cancel at once a running job whose worker is inside a stretch that cannot look at the
        cancel flag (JobRecord.blocked: loading the LLM), checked and changed in one script. The
        worker, when the stretch ends, reads the flag, finds the job cancelled and stops there."""
        try:
            self.transition(job_id, "cancelled", only_from=["running"], require="blocked", stage=None, handoff=None,
                            blocked=None, error={"code": "cancelled", "message": "cancelled by request"})
        except StoreError:
            return False
        return True

    def cancel_requested(self, job_id: str) -> bool:
        return json.loads(self.r.hget(self.job_key(job_id), "cancel_requested") or "false") is True

    def record_stage_time(self, stage: str, seconds: float) -> None:
        with self.r.pipeline() as p:
            p.hincrbyfloat(self._metrics("stage_seconds"), stage, seconds)
            p.hincrby(self._metrics("stage_count"), stage, 1)
            p.execute()

    # ---- events -------------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, level: str = "info", **data: Any) -> int:
        return int(self._append_event(keys=[self._events(job_id)], args=[event_json(message, level, **data)]))

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> tuple[list[JobEvent], bool]:
        """Events with id > after, oldest first, and whether more follow (`after` past MAX_EVENT_ID:
        none; Redis refuses list indices beyond 64 bits)."""
        if after > MAX_EVENT_ID:
            return [], False
        raw = self.r.lrange(self._events(job_id), after, after + limit)  # one extra: has_more
        return [JobEvent.model_validate_json(x) for x in raw[:limit]], len(raw) > limit

    # ---- effort shards ---------------------------------------------------------------------------
    def _shards(self, job_id: str) -> str:
        return self.key("job", job_id, "shards")

    def plan_shards(self, job_id: str, shards: list[list[int]], tokens: list[int]) -> None:
        """A job's effort split into shards (sample indices, prompt tokens of each): what the shard
        tasks read, and the denominators of their progress."""
        key = self._shards(job_id)
        with self.r.pipeline(transaction=True) as p:
            p.delete(key)
            p.hset(key, mapping={"plan": json.dumps(shards), "tokens": json.dumps(tokens),
                                 "started": json.dumps(time.time()), "to_score": json.dumps(sum(map(len, shards)))})
            p.expire(key, self.job_ttl_s)
            p.execute()

    def shard_plan(self, job_id: str) -> dict[str, Any] | None:
        """{"plan", "tokens", "started", "to_score"} of the job's current shards, or None."""
        raw = self.r.hmget(self._shards(job_id), "plan", "tokens", "started", "to_score")
        if raw[0] is None:
            return None
        return dict(zip(("plan", "tokens", "started", "to_score"), (json.loads(x) for x in raw)))

    def shard_progress(self, job_id: str, index: int, done_tokens: int) -> float:
        """Record one shard's progress (prompt tokens scored); returns the fraction of all shards'
        tokens done."""
        key = self._shards(job_id)
        with self.r.pipeline(transaction=False) as p:
            p.hset(key, f"done:{index}", int(done_tokens))
            p.hgetall(key)
            _, fields = p.execute()
        total = sum(json.loads(fields.get("tokens", "[]"))) or 1
        done = sum(int(v) for k, v in fields.items() if k.startswith("done:"))
        return min(1.0, done / total)

    def drop_shards(self, job_id: str) -> None:
        self.r.delete(self._shards(job_id))

    # ---- deliveries (worker/deliveries.py) ------------------------------------------------------
    def begin_delivery(self, work: str) -> int:
        """One more run of `work` started; returns the runs started and not ended, this one included."""
        key = self.key("deliveries", work)
        with self.r.pipeline() as p:
            p.incr(key)
            p.expire(key, self.job_ttl_s)
            runs, _ = p.execute()
        return int(runs)

    def end_delivery(self, work: str) -> None:
        self.r.delete(self.key("deliveries", work))

    # ---- locks and liveness -------------------------------------------------------------------
    def job_lock(self, job_id: str, ttl_s: float) -> JobLock:
        return JobLock(self, self._lock(job_id), ttl_s)

    def worker_alive(self, hostname: str, ttl_s: float, queues: Iterable[str] = ()) -> None:
        """The worker's heartbeat: its key lives `ttl_s`; the value says when and which queues it consumes."""
        value = json.dumps({"at": utcnow().isoformat(), "queues": sorted(set(queues))})
        self.r.set(self.key("worker", hostname), value, px=int(ttl_s * 1000))

    def worker_gone(self, hostname: str) -> None:
        self.r.delete(self.key("worker", hostname))

    def live_workers(self) -> list[str]:
        start = len(self.key("worker", ""))
        return [k[start:] for k in self.r.scan_iter(match=self.key("worker", "*"), count=100)]

    def worker_queues(self) -> dict[str, list[str] | None]:
        """Live worker -> the queues it consumes (None: a heartbeat that does not say, from a worker of
        an earlier version; it may consume any)."""
        names = self.live_workers()
        values = self.r.mget([self.key("worker", n) for n in names]) if names else []
        out: dict[str, list[str] | None] = {}
        for name, value in zip(names, values):
            if value is None:  # expired between the scan and the read
                continue
            try:
                queues = json.loads(value).get("queues")
            except (ValueError, AttributeError):
                queues = None
            out[name] = list(queues) if isinstance(queues, list) and queues else None
        return out

    def stalled_jobs(self, idle_s: float) -> list[JobRecord]:
        """Running jobs that no worker runs and no queue holds: no lock, no hand-off whose task was
        sent (worker/service/handoffs.py), and not updated for `idle_s`. That is a task whose worker
        died, whose message will come back only after the broker's visibility timeout (hours), or
        never if its ack went through. Unfinished jobs are found through the datasets' sets."""
        now = utcnow()
        out = []
        for set_key in self.r.scan_iter(match=self.key("dataset", "*", "jobs"), count=200):
            for job_id in self.r.smembers(set_key):
                job = self.get_job(job_id)
                if job is None or job.status != "running" or (job.handoff and job.handoff_sent) or \
                        self.r.exists(self._lock(job_id)):
                    continue
                last = job.updated_at or job.started_at or job.created_at
                if (now - last).total_seconds() >= idle_s:
                    out.append(job)
        return out

    def _claim_period(self, name: str, holder: str, period_s: float) -> bool:
        return bool(self.r.set(self.key(name), holder, nx=True, px=int(period_s * 1000)))

    def claim_reaper(self, holder: str, period_s: float) -> bool:
        """One worker per period looks for stalled jobs."""
        return self._claim_period("reaper", holder, period_s)

    def claim_storage_sweep(self, holder: str, period_s: float) -> bool:
        """One worker per period sweeps the storage (worker/tasks.py)."""
        return self._claim_period("storage-sweep", holder, period_s)

    def data_pairing(self, candidate: str) -> str:
        """The id that pairs this store with its data folder (worker/service/files.py `paired`): the
        one recorded here, or `candidate` when none was (recorded now, never expiring)."""
        key = self.key("data-folder-id")
        self.r.set(key, candidate, nx=True)
        return self.r.get(key) or candidate

    def recorded_pairing(self) -> str | None:
        return self.r.get(self.key("data-folder-id"))

    # ---- metrics ------------------------------------------------------------------------------
    def metrics_snapshot(self) -> dict[str, dict[str, float]]:
        with self.r.pipeline(transaction=False) as p:
            p.hgetall(self._metrics("jobs"))
            p.hgetall(self._metrics("stage_seconds"))
            p.hgetall(self._metrics("stage_count"))
            jobs, secs, counts = p.execute()
        return {"jobs": {k: float(v) for k, v in jobs.items()},
                "stage_seconds": {k: float(v) for k, v in secs.items()},
                "stage_count": {k: float(v) for k, v in counts.items()}}

    def queue_depth(self, queues: Iterable[str], client: redis.Redis | None = None) -> dict[str, int]:
        """Messages waiting in each Celery queue. Kombu keeps a Redis queue as a list named after
        it (plus one list per priority step), under the same global prefix."""
        c = client or self.r
        out = {}
        for q in queues:
            names = [self.prefix + q] + [f"{self.prefix}{q}\x06\x16{n}" for n in range(1, 10)]
            with c.pipeline(transaction=False) as p:
                for n in names:
                    p.llen(n)
                out[q] = int(sum(p.execute()))
        return out

    def job_exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self.job_key(job_id)))

    def dataset_exists(self, dataset_id: str) -> bool:
        return bool(self.r.exists(self.dataset_key(dataset_id)))

    # ---- test / maintenance -------------------------------------------------------------------
    def delete_all(self) -> int:
        """Delete every key under this prefix (tests; never used by the service itself)."""
        n = 0
        for batch in _chunks(self.r.scan_iter(match=self.prefix + "*", count=500), 500):
            n += self.r.delete(*batch)
        return n

    # ---- paging -------------------------------------------------------------------------------
    def _page(self, index: str, cls: type[R], key_of, cursor: str | None, limit: int, status: str | None
              ) -> tuple[list[R], str | None]:
        """Newest first. The cursor is the last id of the previous page; records that expired are
        dropped from the index as they are met."""
        out: list[R] = []
        top = f"({cursor}" if cursor else "+"
        chunk = max(limit, 20)
        while len(out) < limit:
            ids = self.r.zrevrangebylex(index, top, "-", start=0, num=chunk)
            if not ids:
                return out, None
            with self.r.pipeline(transaction=False) as p:
                for i in ids:
                    p.hgetall(key_of(i))
                raws = p.execute()
            gone = []
            for i, raw in zip(ids, raws):
                rec = _load(cls, raw)
                if rec is None:
                    gone.append(i)
                    continue
                if status is not None and getattr(rec, "status", None) != status:
                    continue
                out.append(rec)
                if len(out) == limit:
                    more = i != ids[-1] or bool(self.r.zrevrangebylex(index, f"({i}", "-", start=0, num=1))
                    return out, (i if more else None)
            if gone:
                self.r.zrem(index, *gone)
            top = f"({ids[-1]}"
        return out, None


def _chunks(it: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
