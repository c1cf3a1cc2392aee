"""Per-tenant limits and fair dispatch (worker/service/quotas.py), against the real Redis, a real API
server process and a real Celery worker process of this module's own: a key prefix and data folder
of their own, and low limits (LIMITS), so that the session's other tests never meet them.

A tenant at its job, dataset or byte limit gets 429 with Retry-After and a body naming the limit;
too many files in one upload and a too-compressed archive are 413s; while one tenant's queue is full
(its jobs held), another tenant's job starts at once; every quota frees itself when a job ends (done
or cancelled) and when a dataset is deleted; a dead process's unsent or unreleased jobs are sent by
the reaper; the checks hold under concurrent requests."""

from __future__ import annotations

import io
import shutil
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from conftest import OwnService, own_service
from svc_helpers import multipart, run_dealrec, tiny_dataset, upload, wait_for, wait_job

from app.archives import RATIO_FLOOR, unpack
from app.errors import ApiError
from dealrec_client import Client, QuotaExceededError
from worker.service.jobstore import JobStore, connect, new_id
from worker.service.quotas import Limits, QuotaExceeded, TenantQuotas
from worker.service.records import DatasetRecord, FileInfo, JobRecord
from worker.service.requests import PruneRequest

TENANTS = ("burst", "calm", "bytes", "count", "files", "other", "cancels", "fails", "reaped", "client")
KEYS = {t: f"{t}-key-0123456789abcdef" for t in TENANTS}
TINY = tiny_dataset()  # 2,409 bytes
SMALL = tiny_dataset(n_users=10, n_items=8)  # 574 bytes
TINY_BYTES = sum(map(len, TINY.values()))
LIMITS = {
    "DEALREC_TENANT_MAX_JOBS": "3",
    "DEALREC_TENANT_MAX_RUNNING": "1",
    "DEALREC_TENANT_MAX_DATASETS": "2",
    "DEALREC_TENANT_MAX_BYTES": str(TINY_BYTES * 3 // 2),  # one TINY fits, two do not
    "DEALREC_TENANT_RETRY_AFTER_S": "7",
    "DEALREC_MAX_UPLOAD_FILES": "6",
    "DEALREC_MAX_ARCHIVE_RATIO": "50",
}
RANDOM_JOB = {"budget": 5, "method": "random"}  # no surrogate, no LLM: a second or so


@pytest.fixture(scope="module")
def svc(service_env, tmp_path_factory) -> Iterator[OwnService]:
    with own_service(service_env, tmp_path_factory, "limits", KEYS, **LIMITS) as service:
        yield service


def _prune(svc: OwnService, dataset_id: str, tenant: str, **body):
    return svc("POST", "/v1/prune", tenant=tenant, json={"dataset_id": dataset_id, **RANDOM_JOB, **body})


def _messages(svc: OwnService, job_id: str, tenant: str) -> list[str]:
    return [e["message"] for e in svc("GET", f"/v1/jobs/{job_id}/events?limit=1000", tenant=tenant).json()["items"]]


def _ready(svc: OwnService, tenant: str, files: dict[str, bytes] = TINY) -> dict:
    d = upload(svc, files, tenant=tenant)
    assert d["status"] == "ready", d
    return d


def _quota_error(r, quota: str, current: int, limit: int) -> dict:
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == LIMITS["DEALREC_TENANT_RETRY_AFTER_S"]
    err = r.json()["error"]
    assert err["code"] == "quota_exceeded" and err["quota"] == quota, err
    assert (err["current"], err["limit"]) == (current, limit), err
    assert err["setting"] in err["message"], err
    return err


def _time(job: dict, field: str) -> datetime:
    return datetime.fromisoformat(job[field].replace("Z", "+00:00"))


def test_a_full_tenant_gets_429_and_another_tenants_job_starts_at_once(svc):
    burst, calm = _ready(svc, "burst"), _ready(svc, "calm")
    jobs = []
    with svc.worker.paused():
        for seed in range(3):
            r = _prune(svc, burst["id"], "burst", seed=seed)
            assert r.status_code == 202, r.text
            jobs.append(r.json())
        # One job handed to the worker, two held in Redis (DEALREC_TENANT_MAX_RUNNING = 1).
        assert _messages(svc, jobs[0]["id"], "burst")[0] == "job queued"
        for job in jobs[1:]:
            assert _messages(svc, job["id"], "burst")[0].startswith("job queued; held until"), job
        assert svc.quotas().job_usage("burst") == {"active": 3, "held": 2}
        # Each job says where it stands: the first is with the workers, the others 1st and 2nd in line,
        # in the answer to its creation, to a poll and in the list.
        assert [j["held_position"] for j in jobs] == [None, 1, 2]
        assert [svc("GET", f"/v1/jobs/{j['id']}", tenant="burst").json()["held_position"] for j in jobs] == [None, 1, 2]
        listed = {j["id"]: j["held_position"] for j in svc("GET", "/v1/jobs", tenant="burst").json()["items"]}
        assert [listed[j["id"]] for j in jobs] == [None, 1, 2]
        # The fourth: the tenant is at DEALREC_TENANT_MAX_JOBS.
        err = _quota_error(_prune(svc, burst["id"], "burst", seed=9), "jobs", 3, 3)
        assert err["setting"] == "DEALREC_TENANT_MAX_JOBS"
        # Another tenant's job goes straight to the workers, behind the first tenant's one job there
        # and ahead of its held ones.
        r = _prune(svc, calm["id"], "calm")
        assert r.status_code == 202, r.text
        assert _messages(svc, r.json()["id"], "calm")[0] == "job queued"
    other = wait_job(svc, r.json()["id"], tenant="calm", timeout=60)
    assert other["status"] == "succeeded", other
    done = [wait_job(svc, j["id"], tenant="burst", timeout=60) for j in jobs]
    assert all(j["status"] == "succeeded" and j["held_position"] is None for j in done), done
    # It started while the first tenant still had jobs waiting (both held ones started after it) ...
    assert _time(other, "started_at") < min(_time(j, "started_at") for j in done[1:]), (other, done)
    # ... and within seconds of its request (it waited for one job of the other tenant at most).
    assert (_time(other, "started_at") - _time(other, "created_at")).total_seconds() < 30, other
    for job in done[1:]:
        assert "job handed to the workers" in _messages(svc, job["id"], "burst")
    # Every slot came back as the jobs ended: the tenant may queue three again.
    assert svc.quotas().job_usage("burst") == {"active": 0, "held": 0}
    again = [_prune(svc, burst["id"], "burst", seed=20 + i) for i in range(3)]
    assert [r.status_code for r in again] == [202] * 3, [r.text for r in again]
    for r in again:
        assert wait_job(svc, r.json()["id"], tenant="burst", timeout=60)["status"] == "succeeded"


def test_cancelled_jobs_free_their_slots_and_release_the_next(svc):
    d = _ready(svc, "cancels")
    with svc.worker.paused():
        jobs = [_prune(svc, d["id"], "cancels", seed=i).json() for i in range(3)]
        _quota_error(_prune(svc, d["id"], "cancels", seed=7), "jobs", 3, 3)
        # A held job cancelled: out of the held list and the quota at once, never sent.
        r = svc("POST", f"/v1/jobs/{jobs[2]['id']}/cancel", tenant="cancels")
        assert r.status_code == 202 and r.json()["status"] == "cancelled", r.text
        assert svc.quotas().job_usage("cancels") == {"active": 2, "held": 1}
        r = _prune(svc, d["id"], "cancels", seed=8)
        assert r.status_code == 202, r.text
        late = r.json()
        # The job with the workers cancelled (still queued: the worker is stopped): the next held
        # one is handed to the workers in its place.
        r = svc("POST", f"/v1/jobs/{jobs[0]['id']}/cancel", tenant="cancels")
        assert r.status_code == 202 and r.json()["status"] == "cancelled", r.text
        assert "job handed to the workers" in _messages(svc, jobs[1]["id"], "cancels")
        assert svc.quotas().job_usage("cancels") == {"active": 2, "held": 1}
    for job in (jobs[1], late):
        assert wait_job(svc, job["id"], tenant="cancels", timeout=60)["status"] == "succeeded"
    assert "job handed to the workers" not in _messages(svc, jobs[2]["id"], "cancels")
    assert svc.quotas().job_usage("cancels") == {"active": 0, "held": 0}


def test_failed_jobs_free_their_slots_and_release_the_next(svc):
    d = _ready(svc, "fails")
    with svc.worker.paused():
        jobs = [_prune(svc, d["id"], "fails", seed=i).json() for i in range(2)]
        assert svc.quotas().job_usage("fails") == {"active": 2, "held": 1}
        # The dataset's files gone under the jobs: the worker cannot load them, every job fails.
        shutil.rmtree(Path(svc.env["DEALREC_DATA_DIR"]) / "datasets" / d["id"] / "files")
    for job in jobs:
        done = wait_job(svc, job["id"], tenant="fails", timeout=60)
        assert done["status"] == "failed" and done["error"]["code"] == "invalid_dataset", done
        assert svc.env["DEALREC_DATA_DIR"] not in str(done["error"]), done  # no server path
    assert "job handed to the workers" in _messages(svc, jobs[1]["id"], "fails")
    assert svc.quotas().job_usage("fails") == {"active": 0, "held": 0}


def test_dataset_bytes_and_count_limits_and_deletion_frees_them(svc):
    first = _ready(svc, "bytes")
    r = svc("POST", "/v1/datasets", tenant="bytes", files=multipart(TINY))
    err = _quota_error(r, "bytes", TINY_BYTES, int(LIMITS["DEALREC_TENANT_MAX_BYTES"]))
    assert err["setting"] == "DEALREC_TENANT_MAX_BYTES" and err["requested"] == TINY_BYTES
    assert len(svc("GET", "/v1/datasets", tenant="bytes").json()["items"]) == 1  # nothing stored
    assert svc("DELETE", f"/v1/datasets/{first['id']}", tenant="bytes").status_code == 204
    assert svc.quotas().storage("bytes") == (0, 0)
    _ready(svc, "bytes")

    kept = [_ready(svc, "count", SMALL) for _ in range(2)]
    # At the count already: refused before the body is read, and so is a new version.
    err = _quota_error(svc("POST", "/v1/datasets", tenant="count", files=multipart(SMALL)), "datasets", 2, 2)
    assert err["setting"] == "DEALREC_TENANT_MAX_DATASETS"
    r = svc("POST", f"/v1/datasets/{kept[0]['id']}/versions", tenant="count",
            files=multipart({"sequential_train.txt": b"1 2 3\n"}))
    _quota_error(r, "datasets", 2, 2)
    assert svc("DELETE", f"/v1/datasets/{kept[1]['id']}", tenant="count").status_code == 204
    assert _ready(svc, "count", SMALL)["status"] == "ready"
    # Another tenant is not concerned.
    assert svc("POST", "/v1/datasets", tenant="other", files=multipart(SMALL)).status_code == 202


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_too_many_files_and_too_compressed_archives_are_413(svc):
    # The schema states this server's limit on the parts of both upload routes, and the API enforces it.
    paths = svc.client.get("/openapi.json").json()["paths"]
    for path in ("/v1/datasets", "/v1/datasets/{dataset_id}/versions"):
        files = paths[path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["files"]
        assert files["maxItems"] == int(LIMITS["DEALREC_MAX_UPLOAD_FILES"]), (path, files)
    before = len(svc("GET", "/v1/datasets", tenant="files").json()["items"])
    extra = {f"notes{i}.txt": b"x\n" for i in range(2)}  # 5 data files + 2 = 7 > DEALREC_MAX_UPLOAD_FILES
    r = svc("POST", "/v1/datasets", tenant="files", files=multipart({**TINY, **extra}))
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "too_many_files" and err["limit"] == 6 and err["setting"] == "DEALREC_MAX_UPLOAD_FILES"
    assert "DEALREC_MAX_UPLOAD_FILES" in err["message"]
    # 2 MiB of one repeated line, a few KiB zipped: far past 50x.
    bomb = _zip({**{f"d/{k}": v for k, v in TINY.items()}, "d/sequential_train.txt": b"1 2\n" * (1 << 19)})
    r = svc("POST", "/v1/datasets", tenant="files", files=multipart({"bomb.zip": bomb}))
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "archive_too_compressed" and err["limit"] == 50, err
    assert err["setting"] == "DEALREC_MAX_ARCHIVE_RATIO" and err["archive_bytes"] == len(bomb)
    assert len(svc("GET", "/v1/datasets", tenant="files").json()["items"]) == before
    # The same dataset zipped as real data is (a few times smaller) is taken.
    r = svc("POST", "/v1/datasets", tenant="files", files=multipart({"tiny.zip": _zip(TINY)}))
    assert r.status_code == 202, r.text


def test_the_ratio_is_checked_while_unpacking(tmp_path):
    """The bomb is refused before it is written: nothing past the ratio's budget reaches the disk."""
    zeros = 64 << 20
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(_zip({"d/a.txt": b"1 2\n" * 1000, "d/sequential_train.txt": b"\0" * zeros}))
    with pytest.raises(ApiError) as exc:
        unpack(archive, tmp_path / "out", max_bytes=1 << 40, max_files=10, max_ratio=100)
    assert exc.value.status == 413 and exc.value.code == "archive_too_compressed"
    written = sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert written <= max(100 * archive.stat().st_size, RATIO_FLOOR) < zeros


class _Recorded:
    """What a client sent and got, from httpx's event hooks: (method, path, Idempotency-Key) of each
    request, and the status of each answer."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        self.statuses: list[int] = []

    def client(self, svc: OwnService, tenant: str, **kw) -> Client:
        hooks = {"request": [lambda r: self.requests.append((r.method, r.url.path, r.headers.get("idempotency-key")))],
                 "response": [lambda r: self.statuses.append(r.status_code)]}
        http = httpx.Client(base_url=svc.server.url, event_hooks=hooks, timeout=60)
        return Client(svc.server.url, KEYS[tenant], http_client=http, **kw)


def test_the_client_waits_out_a_429_then_names_the_quota(svc, tmp_path):
    """A job request past the tenant's job limit: the Python client sends it again after each Retry-After
    (7 s here), at most `quota_retries` times and never waiting longer than `max_retry_wait`, always with
    the same Idempotency-Key (one job in the end, never two); past its retries it raises
    QuotaExceededError naming the quota, and `dealrec remote prune` says the same."""
    d = _ready(svc, "client")
    with svc.worker.paused():
        jobs = [_prune(svc, d["id"], "client", seed=i) for i in range(3)]  # at DEALREC_TENANT_MAX_JOBS
        assert [r.status_code for r in jobs] == [202] * 3, [r.text for r in jobs]
        seen = _Recorded()
        t0 = time.monotonic()
        with seen.client(svc, "client", quota_retries=0) as c, pytest.raises(QuotaExceededError) as info:
            c.jobs.create(d["id"], budget=5, method="random")
        err = info.value
        assert time.monotonic() - t0 < 5 and seen.statuses == [429]
        assert (err.status_code, err.code, err.quota, err.current, err.limit, err.setting, err.retry_after) == (
            429, "quota_exceeded", "jobs", 3, 3, "DEALREC_TENANT_MAX_JOBS", 7.0), err.details
        assert str(err).startswith("429 quota_exceeded (jobs): this tenant has 3 queued or running jobs"), str(err)

        # Bounded: two retries, each wait cut to max_retry_wait, not the 7 s asked; the key sent each time.
        seen = _Recorded()
        t0 = time.monotonic()
        with seen.client(svc, "client", quota_retries=2, max_retry_wait=0.5) as c, \
                pytest.raises(QuotaExceededError) as info:
            c.jobs.create(d["id"], budget=5, method="random", idempotency_key="bounded-0123")
        assert 1.0 <= time.monotonic() - t0 < 7
        assert seen.requests == [("POST", "/v1/prune", "bounded-0123")] * 3 and seen.statuses == [429] * 3
        assert info.value.retries == 2 and str(info.value).endswith("(after 2 retries)"), str(info.value)

        r = run_dealrec("remote", "prune", "--url", svc.server.url, "--key", KEYS["client"], "--dataset-id", d["id"],
                        "--budget", "5", "--method", "random", "--quota-retries", "0", "--no-progress",
                        "--out", str(tmp_path / "out"), timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "429 quota_exceeded (jobs)" in r.stderr and "DEALREC_TENANT_MAX_JOBS = 3" in r.stderr, r.stderr

        # Retries enough to outlast the three jobs: started now, refused at first ...
        seen, created = _Recorded(), {}

        def create() -> None:
            with seen.client(svc, "client", quota_retries=3) as c:
                created["job"] = c.jobs.create(d["id"], budget=5, method="random", seed=9)

        thread = threading.Thread(target=create)
        thread.start()
        wait_for(lambda: {"answers": list(seen.statuses)}, lambda r: r["answers"], timeout=30)
        assert seen.statuses == [429]
    # ... then the worker runs them and frees the slots: the next try after Retry-After gets its job.
    thread.join(timeout=90)
    assert "job" in created, seen.statuses
    assert seen.statuses[0] == 429 and seen.statuses[-1] == 202 and set(seen.statuses[1:-1]) <= {429}, seen.statuses
    assert len({key for _, _, key in seen.requests}) == 1  # one Idempotency-Key for every try
    listed = svc("GET", "/v1/jobs?limit=200", tenant="client").json()["items"]
    assert sorted(j["id"] for j in listed) == sorted([created["job"].id] + [r.json()["id"] for r in jobs])
    for job in listed:
        assert wait_job(svc, job["id"], tenant="client", timeout=60)["status"] == "succeeded"


def _job_record(dataset_id: str, tenant: str, seed: int) -> JobRecord:
    req = PruneRequest.model_validate({"dataset_id": dataset_id, **RANDOM_JOB, "seed": seed})
    return JobRecord(id=new_id("job"), tenant=tenant, dataset_id=dataset_id,
                     request=req.model_dump(mode="json", by_alias=True))


def test_the_reaper_sends_what_a_dead_process_left(svc):
    """An API that died right after creating a job (never sent) and a worker that died between
    ending a job and releasing the next: the workers' reaper sends both within its bounded wait."""
    d = _ready(svc, "reaped")
    quotas = svc.quotas()
    unsent = quotas.admit_job(_job_record(d["id"], "reaped", 1), announce=True)
    held = quotas.admit_job(_job_record(d["id"], "reaped", 2), announce=True)
    assert unsent.send == (unsent.job.id,) and held.held and not held.send
    done = wait_job(svc, unsent.job.id, tenant="reaped", timeout=60)
    assert done["status"] == "succeeded", done
    assert any(m.startswith("job handed to the workers again") for m in _messages(svc, unsent.job.id, "reaped"))
    # Released by the worker that ended the first one.
    assert wait_job(svc, held.job.id, tenant="reaped", timeout=60)["status"] == "succeeded"

    # A job ended by a process that died before releasing the next: the reaper releases it.
    first = quotas.admit_job(_job_record(d["id"], "reaped", 3))
    quotas.dispatched(first.send)  # as if sent; it never runs (no message)
    waiting = quotas.admit_job(_job_record(d["id"], "reaped", 4), announce=True)
    assert first.send == (first.job.id,) and waiting.held
    svc.store.transition(first.job.id, "cancelled")  # and no release follows
    assert wait_job(svc, waiting.job.id, tenant="reaped", timeout=60)["status"] == "succeeded"
    assert "job handed to the workers" in _messages(svc, waiting.job.id, "reaped")


@pytest.fixture
def own_store(service_env) -> Iterator[JobStore]:
    """A prefix no worker reads: jobs admitted here are never sent."""
    store = JobStore(connect(service_env["DEALREC_REDIS_URL"]),
                     f"{service_env['DEALREC_KEY_PREFIX']}q{uuid.uuid4().hex[:6]}:")
    yield store
    store.delete_all()


def _race(n: int, attempt: Callable[[int], object]) -> list[object]:
    """`attempt(i)` from n threads released at once; each result or exception."""
    start, out = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        start.wait()
        try:
            out[i] = attempt(i)
        except Exception as exc:  # noqa: BLE001 - the test counts them
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_quotas_hold_under_concurrent_requests(own_store, service_env):
    """Twelve processes' worth of clients (one connection each) at once: exactly the limit passes."""
    url, prefix = service_env["DEALREC_REDIS_URL"], own_store.prefix
    limits = Limits(jobs=3, running=1, datasets=2, bytes=10_000)
    ds = DatasetRecord(id=new_id("ds"), tenant="t", status="ready")
    own_store.create_dataset(ds)

    def job(i: int):
        return TenantQuotas(JobStore(connect(url), prefix), limits).admit_job(_job_record(ds.id, "t", i))

    results = _race(12, job)
    admitted = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(admitted) == 3 and len(refused) == 9, results
    assert all(isinstance(r, QuotaExceeded) and r.quota == "jobs" and r.current == 3 for r in refused), refused
    assert sum(not a.held for a in admitted) == 1  # one handed on, two held
    assert TenantQuotas(own_store, limits).job_usage("t") == {"active": 3, "held": 2}

    def dataset(i: int):
        rec = DatasetRecord(id=new_id("ds"), tenant="u", files=[FileInfo(name="a.txt", bytes=3000)])
        return TenantQuotas(JobStore(connect(url), prefix), limits).admit_dataset(rec)

    results = _race(12, dataset)
    # Two fit the count and 6,000 of the 10,000 bytes; every other one is refused.
    assert sum(r is None for r in results) == 2, results
    assert TenantQuotas(own_store, limits).storage("u") == (2, 6000)


def test_every_limit_is_in_the_readme():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in [*LIMITS, "DEALREC_MAX_ARCHIVE_FILES", "DEALREC_MAX_UPLOAD_BYTES", "DEALREC_MAX_UNPACKED_BYTES"]:
        assert f"`{name}`" in readme, name
