"""The job store against the real Redis: checked transitions, events paging, idempotency, locks, expiry."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from worker.service.jobstore import JobStore, StoreError, connect, is_valid_id, new_id
from worker.service.records import DatasetRecord, JobRecord


@pytest.fixture()
def s(service_env) -> JobStore:
    # A prefix of its own: these tests never see (or clean) the API tests' keys.
    store = JobStore(connect(service_env["DEALREC_REDIS_URL"]),
                     f"{service_env['DEALREC_KEY_PREFIX']}u{uuid.uuid4().hex[:6]}:", job_ttl_s=120)
    yield store
    store.delete_all()


def _ready_dataset(s: JobStore, tenant: str = "t1") -> DatasetRecord:
    ds = DatasetRecord(id=new_id("ds"), tenant=tenant, status="ready")
    s.create_dataset(ds)
    return ds


def _job(s: JobStore, ds: DatasetRecord, **kw) -> JobRecord:
    job, created = s.create_job(JobRecord(id=new_id("job"), tenant=ds.tenant, dataset_id=ds.id), **kw)
    return job


def test_ids_sort_by_time_and_are_checked():
    a = new_id("job")
    time.sleep(0.002)
    b = new_id("job")
    assert a < b and is_valid_id("job", a) and not is_valid_id("ds", a)
    assert not is_valid_id("job", "job_../../etc") and not is_valid_id("job", a + "0")


def test_transitions_are_checked(s):
    ds = _ready_dataset(s)
    job = _job(s, ds)
    assert s.transition(job.id, "running") == "queued"
    s.transition(job.id, "cancelled")
    with pytest.raises(StoreError) as exc:
        s.transition(job.id, "succeeded")
    assert exc.value.code == "invalid_transition" and exc.value.extra["status"] == "cancelled"
    assert s.get_job(job.id).status == "cancelled"
    assert not s.update_job(job.id, allowed=["running"], progress=0.9)  # a stale worker cannot write
    # Finished: expires, and no longer holds its dataset.
    assert 0 < s.r.ttl(s.key("job", job.id)) <= 120
    assert s.delete_dataset("t1", ds.id) == "deleted"


def test_cancel_queued_and_running(s):
    ds = _ready_dataset(s)
    queued, running = _job(s, ds), _job(s, ds)
    assert s.request_cancel(queued.id) == "queued"
    assert s.get_job(queued.id).status == "cancelled"
    s.transition(running.id, "running")
    assert s.request_cancel(running.id) == "running"
    assert s.cancel_requested(running.id) and s.get_job(running.id).status == "running"
    s.transition(running.id, "succeeded")
    with pytest.raises(StoreError):
        s.request_cancel(running.id)


def test_dataset_in_use_cannot_be_deleted(s):
    ds = _ready_dataset(s)
    job = _job(s, ds)
    assert s.delete_dataset("t1", ds.id) == "busy"
    assert s.delete_dataset("t2", ds.id) == "missing"  # another tenant's
    s.transition(job.id, "failed")
    assert s.delete_dataset("t1", ds.id) == "deleted"
    assert s.get_dataset(ds.id) is None


def test_job_needs_a_ready_dataset_of_the_tenant(s):
    ds = DatasetRecord(id=new_id("ds"), tenant="t1")  # validating
    s.create_dataset(ds)
    with pytest.raises(StoreError) as exc:
        _job(s, ds)
    assert exc.value.code == "dataset_not_ready"
    ready = _ready_dataset(s)
    with pytest.raises(StoreError) as exc:
        s.create_job(JobRecord(id=new_id("job"), tenant="t2", dataset_id=ready.id))
    assert exc.value.code == "not_found"


def test_idempotency(s):
    ds = _ready_dataset(s)
    first = _job(s, ds, idempotency_key="k1", request_hash="h")
    again, created = s.create_job(JobRecord(id=new_id("job"), tenant="t1", dataset_id=ds.id),
                                  idempotency_key="k1", request_hash="h")
    assert not created and again.id == first.id
    with pytest.raises(StoreError) as exc:
        s.create_job(JobRecord(id=new_id("job"), tenant="t1", dataset_id=ds.id), idempotency_key="k1",
                     request_hash="other")
    assert exc.value.code == "idempotency_conflict"


def test_events_page_in_order(s):
    ds = _ready_dataset(s)
    job = _job(s, ds)
    for i in range(25):
        s.add_event(job.id, f"e{i}", n=i)
    page, more = s.events(job.id, after=0, limit=10)
    assert [e.id for e in page] == list(range(1, 11)) and more
    page, more = s.events(job.id, after=20, limit=10)
    assert [e.message for e in page] == ["e20", "e21", "e22", "e23", "e24"] and not more


def test_events_from_many_threads_get_unique_ordered_ids(s):
    ds = _ready_dataset(s)
    job = _job(s, ds)
    threads = [threading.Thread(target=lambda t=t: [s.add_event(job.id, f"t{t}") for _ in range(20)])
               for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    page, more = s.events(job.id, limit=1000)
    assert [e.id for e in page] == list(range(1, 81)) and not more


def test_list_pages_newest_first_with_status_filter(s):
    ds = _ready_dataset(s)
    ids = []
    for _ in range(5):
        ids.append(_job(s, ds).id)
        time.sleep(0.002)
    s.transition(ids[1], "cancelled")
    page, cursor = s.list_jobs("t1", limit=2)
    assert [j.id for j in page] == ids[::-1][:2] and cursor == ids[3]
    page2, cursor2 = s.list_jobs("t1", cursor=cursor, limit=10)
    assert [j.id for j in page2] == ids[::-1][2:] and cursor2 is None
    cancelled, _ = s.list_jobs("t1", status="cancelled")
    assert [j.id for j in cancelled] == [ids[1]]
    assert s.list_jobs("t2")[0] == []


def test_lock_is_exclusive_and_kept_alive(s):
    a = s.job_lock("job_x", ttl_s=0.6)
    b = s.job_lock("job_x", ttl_s=0.6)
    assert a.acquire() and not b.acquire()
    with a.keepalive():
        time.sleep(1.5)  # longer than the TTL: the heartbeat renewed it
        assert not b.acquire() and not a.lost.is_set()
    assert b.acquire()  # released on exit
    b.release()


def test_lock_lost_is_noticed(s):
    a = s.job_lock("job_y", ttl_s=0.6)
    assert a.acquire()
    with a.keepalive():
        s.r.delete(a.key)
        s.job_lock("job_y", ttl_s=5).acquire()  # someone else took it
        assert a.lost.wait(2.0)


def test_metrics_counters_follow_transitions(s):
    ds = _ready_dataset(s)
    j1, _j2 = _job(s, ds), _job(s, ds)
    s.transition(j1.id, "running")
    s.transition(j1.id, "succeeded")
    snap = s.metrics_snapshot()["jobs"]
    assert snap["queued"] == 1 and snap["running"] == 0 and snap["succeeded"] == 1


def test_storage_sweeps_only_a_data_folder_paired_with_its_store(s, tmp_path):
    """An emptied Redis (or another prefix or database) answers "no record" for every job and dataset:
    the folder's pairing id then finds no match in the store and nothing is swept."""
    import os
    import time

    from worker.service.files import Files

    files = Files(tmp_path / "data")
    assert files.paired(s)  # first time: one id, on both sides
    marker = tmp_path / "data" / Files.PAIRING_FILE
    assert marker.read_text().strip() == s.recorded_pairing()
    assert files.paired(s)
    # A new data folder (or one whose file was lost) adopts the store's id.
    other = Files(tmp_path / "other")
    assert other.paired(s) and (tmp_path / "other" / Files.PAIRING_FILE).read_text() == marker.read_text()

    old = time.time() - 3600
    orphan = tmp_path / "data" / "jobs" / new_id("job")
    orphan.mkdir(parents=True)
    os.utime(orphan, (old, old))
    s.r.delete(s.key("data-folder-id"))  # the store lost its data
    assert not files.paired(s)
    assert s.recorded_pairing() is None  # a failed check records nothing
    assert orphan.is_dir()
    # Paired (an operator re-created the id), the orphan goes; a folder changed just now stays.
    s.data_pairing(marker.read_text().strip())
    assert files.paired(s)
    fresh = tmp_path / "data" / "jobs" / new_id("job")
    fresh.mkdir()
    assert files.sweep(s.job_exists, s.dataset_exists, tmp_max_age_s=600) == 1
    assert not orphan.exists() and fresh.is_dir()
