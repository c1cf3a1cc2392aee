"""Dataset records an API left behind (worker/service/uploads.py), against the real Redis, API server and
Celery workers of this module's own (conftest's own_service): a short DEALREC_STALE_UPLOAD_S, and a
sweeping worker on the `gpu` queue only, so that a validation task sent to `cpu` stays queued as long
as the test wants.

A record whose API died before sending its validation task (after moving its files into place, or
before) is marked `invalid` with `upload_abandoned` once it is older than the stale age, its quota share
freed and its files removed; one whose validation runs is left alone until it stops running; one whose
validation task is queued is never swept, however long it waits, and validates once a worker takes it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import OwnService, WorkerProcess, own_service
from svc_helpers import LIVE, multipart, tiny_dataset, wait_for, write_dataset

from worker.service.files import Files
from worker.service.jobstore import new_id
from worker.service.records import DatasetRecord, FileInfo
from worker.service.uploads import ABANDONED_CODE, unsent_key, validation_work

STALE_S = 4  # DEALREC_STALE_UPLOAD_S of this module's service: its workers sweep every second
KEYS = {t: f"{t}-key-0123456789abcdef" for t in ("left", "queued")}
FILES = tiny_dataset(n_users=12, seed=3)


@pytest.fixture(scope="module")
def svc(service_env, tmp_path_factory) -> Iterator[OwnService]:
    with own_service(service_env, tmp_path_factory, "abandoned", KEYS, queues="gpu",
                     DEALREC_STALE_UPLOAD_S=str(STALE_S), DEALREC_TENANT_MAX_DATASETS="3") as service:
        yield service


def _files(svc: OwnService) -> Files:
    return Files(Path(svc.env["DEALREC_DATA_DIR"]))


def _left_behind(svc: OwnService, tenant: str, published: bool) -> DatasetRecord:
    """What an API leaves when it dies after recording an upload and before sending its validation
    task: the record (quota taken, in the unsent set) and, if it got that far, its files in place."""
    rec = DatasetRecord(id=new_id("ds"), tenant=tenant, name="left",
                        files=[FileInfo(name=n, bytes=len(b)) for n, b in FILES.items()])
    svc.quotas().admit_dataset(rec)
    if published:
        write_dataset(_files(svc).dataset_files(rec.id), FILES)
    return rec


def _dataset(svc: OwnService, dataset_id: str, tenant: str) -> dict:
    r = svc("GET", f"/v1/datasets/{dataset_id}", tenant=tenant)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_record_left_behind_is_marked_invalid_and_its_quota_freed(svc):
    size = sum(map(len, FILES.values()))
    published = _left_behind(svc, "left", published=True)
    unpublished = _left_behind(svc, "left", published=False)
    # A third one whose validation runs right now (its run counted, as worker/deliveries.py does).
    running = _left_behind(svc, "left", published=True)
    svc.store.begin_delivery(validation_work(running.id))
    assert svc.quotas().storage("left") == (3, 3 * size)
    # The tenant is at DEALREC_TENANT_MAX_DATASETS: refused while the three count.
    r = svc("POST", "/v1/datasets", tenant="left", files=multipart(FILES))
    assert r.status_code == 429 and r.json()["error"]["quota"] == "datasets", r.text
    assert _dataset(svc, published.id, "left")["status"] == "validating"

    for rec in (published, unpublished):
        d = wait_for(lambda rec=rec: _dataset(svc, rec.id, "left"), lambda d: d["status"] != "validating",
                     timeout=STALE_S + 30, interval=0.2)
        assert d["status"] == "invalid", d
        assert [e["code"] for e in d["errors"]] == [ABANDONED_CODE], d
        assert "upload the files again" in d["errors"][0]["message"], d
        assert d["validated_at"] is not None
        # It goes after DEALREC_JOB_TTL_S, as a finished job does, and its files at once.
        assert 0 < svc.store.r.ttl(svc.store.dataset_key(rec.id)) <= int(svc.env.get("DEALREC_JOB_TTL_S", 604800))
        assert not _files(svc).dataset_dir(rec.id).exists()
    assert svc.quotas().storage("left") == (1, size)  # the running one still counts
    listed = {d["id"]: d["status"] for d in svc("GET", "/v1/datasets", tenant="left").json()["items"]}
    assert listed == {published.id: "invalid", unpublished.id: "invalid", running.id: "validating"}

    # The running one is left alone past the stale age, for as long as its validation runs ...
    time.sleep(3)
    assert _dataset(svc, running.id, "left")["status"] == "validating"
    assert svc.store.r.zscore(unsent_key(svc.store), running.id) is not None
    assert _files(svc).dataset_files(running.id).is_dir()
    # ... and swept once that run stopped without ending it (its worker died, say).
    svc.store.end_delivery(validation_work(running.id))
    d = wait_for(lambda: _dataset(svc, running.id, "left"), lambda d: d["status"] != "validating",
                 timeout=30, interval=0.2)
    assert d["status"] == "invalid" and d["errors"][0]["code"] == ABANDONED_CODE, d
    assert svc.quotas().storage("left") == (0, 0)
    assert svc.store.r.zcard(unsent_key(svc.store)) == 0
    # The quota they held is the tenant's again.
    r = svc("POST", "/v1/datasets", tenant="left", files=multipart(FILES))
    assert r.status_code == 202, r.text


def test_a_record_whose_validation_is_queued_is_never_swept(svc, tmp_path):
    r = svc("POST", "/v1/datasets", tenant="queued", files=multipart(FILES))
    assert r.status_code == 202, r.text
    dataset_id = r.json()["id"]
    # Its task was sent (to `cpu`, which no worker takes yet): it left the unsent set.
    assert svc.store.r.zscore(unsent_key(svc.store), dataset_id) is None
    time.sleep(2 * STALE_S + 2)  # several sweeps past the stale age
    assert _dataset(svc, dataset_id, "queued")["status"] == "validating"
    assert svc.quotas().storage("queued")[0] == 1
    # A worker on `cpu` takes the task: the dataset validates as usual.
    cpu = WorkerProcess(svc.env, tmp_path, svc.store, queues="cpu")
    cpu.n = 31  # its own log file
    LIVE[id(cpu)] = cpu
    try:
        cpu.start()
        d = wait_for(lambda: _dataset(svc, dataset_id, "queued"), lambda d: d["status"] != "validating",
                     timeout=60, interval=0.2)
    finally:
        cpu.stop()
        LIVE.pop(id(cpu), None)
    assert d["status"] == "ready" and d["errors"] == [], d
