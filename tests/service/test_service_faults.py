"""Work that goes wrong on a worker (issue 14): Celery's result backend never holds an exception's
payload, work that kills its worker twice is parked instead of redelivered forever, stale partial
uploads are swept within minutes, and a cancel that arrives while the LLM loads does not wait for it."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import WorkerProcess
from svc_helpers import FAST, auth, tiny_dataset, upload, wait_for, wait_job, write_dataset

from worker.celery_app import TASK_VALIDATE, make_celery
from worker.deliveries import PARKED_DATASET, PARKED_JOB
from worker.service.jobstore import new_id
from worker.service.records import DatasetRecord

# A job slow enough to kill mid-way: the surrogate trains for many epochs (no early stop).
SLOW = {"surrogate": {"epochs": 5000, "eval_every": 5000, "patience": 1}, "influence": {"lissa_steps": 200}}


def _prune(api, dataset_id: str, **body) -> dict:
    r = api("POST", "/v1/prune", json={"dataset_id": dataset_id, **body})
    assert r.status_code == 202, r.text
    return r.json()


def _messages(api, job_id: str) -> list[str]:
    return [e["message"] for e in api("GET", f"/v1/jobs/{job_id}/events?limit=1000").json()["items"]]


def _task_results(store) -> dict[str, int]:
    """Every result Celery's backend holds under the session's prefix: key -> bytes."""
    keys = list(store.r.scan_iter(match=store.prefix + "celery-task-meta-*", count=500))
    return {k: store.r.strlen(k) for k in keys}


# ---------------------------------------------------------------------------------------------------
# Celery results


def test_celery_results_hold_no_exception_payload(api, worker, settings, store):
    """A task whose error echoes a megabyte of its message (an unexpected keyword argument) fails on
    the worker, which stays up, and nothing reaches the result backend; neither does the result
    of a validation or of a job."""
    huge = "k" * (1 << 20)
    sent = make_celery(settings).send_task(TASK_VALIDATE, args=["ds_x"], kwargs={huge: 1}, queue="cpu")
    wait_for(lambda: {"log": worker.tail(1 << 22)}, lambda r: f"[{sent.id}] raised unexpected" in r["log"],
             timeout=60, interval=0.5)
    assert not list(store.r.scan_iter(match=f"*{sent.id}*")), "the failed task's result was stored"
    assert worker.proc.poll() is None

    d = upload(api, tiny_dataset(n_users=20, seed=40))
    assert d["status"] == "ready", d
    job = wait_job(api, _prune(api, d["id"], budget=3, method="influence", params=FAST)["id"])
    assert job["status"] == "succeeded", job
    # Only the effort shards' results (a chord counts them) may be stored, and they are short.
    assert all(n < 2048 for n in _task_results(store).values()), _task_results(store)


# ---------------------------------------------------------------------------------------------------
# Work that kills its worker


def test_a_job_that_kills_its_worker_twice_is_parked(api, worker, store):
    """The worker running a job is SIGKILLed twice at the same stage (as an input that exhausts its
    memory would kill it); the third delivery does not run the job but fails it with a short error,
    and the worker that got it is up and takes the next job."""
    d = upload(api, tiny_dataset(seed=41))
    job = _prune(api, d["id"], budget=4, method="influence", params=SLOW)
    for _ in range(2):  # two deliveries, each killed mid-run
        pid = worker.proc.pid
        # Running on this worker process (its run is counted once the job names the process).
        wait_for(lambda: store.get_job(job["id"]).model_dump(),
                 lambda j, pid=pid: j["status"] == "running" and j["stage"] == "surrogate"
                 and (j["worker"] or "").endswith(f":{pid}"), timeout=180, interval=0.2)
        worker.kill()
        worker.start()
    done = wait_job(api, job["id"], timeout=120)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "worker_lost" and done["error"]["message"] == PARKED_JOB, done
    assert f"job failed: {PARKED_JOB}" in _messages(api, job["id"])
    # The worker that parked it is up and runs the next job.
    assert worker.proc.poll() is None
    nxt = wait_job(api, _prune(api, d["id"], budget=4, method="random", seed=1)["id"])
    assert nxt["status"] == "succeeded", nxt
    assert api("GET", f"/v1/jobs/{job['id']}").json()["status"] == "failed"


def test_a_validation_whose_worker_stopped_twice_is_parked(api, worker, settings, store):
    """A dataset whose validation ran twice without ending (both workers died: the store counted two
    runs and no end) is marked invalid with a short error when its message comes a third time."""
    from worker.service.files import Files

    rec = DatasetRecord(id=new_id("ds"), tenant="acme", name="crashes")
    store.create_dataset(rec)
    write_dataset(Files(settings.data_dir).dataset_files(rec.id), tiny_dataset(n_users=12, seed=42))
    for _ in range(2):
        store.begin_delivery(f"dataset:{rec.id}:validate")
    make_celery(settings).send_task(TASK_VALIDATE, args=[rec.id], queue="cpu", ignore_result=True)
    d = wait_for(lambda: api("GET", f"/v1/datasets/{rec.id}").json(), lambda d: d["status"] != "validating")
    assert d["status"] == "invalid", d
    assert [(e["code"], e["message"]) for e in d["errors"]] == [("worker_lost", PARKED_DATASET)]

    # One run that died is not enough: the same files validate on the second delivery.
    again = DatasetRecord(id=new_id("ds"), tenant="acme", name="one crash")
    store.create_dataset(again)
    shutil.copytree(Files(settings.data_dir).dataset_files(rec.id), Files(settings.data_dir).dataset_files(again.id))
    store.begin_delivery(f"dataset:{again.id}:validate")
    make_celery(settings).send_task(TASK_VALIDATE, args=[again.id], queue="cpu", ignore_result=True)
    d = wait_for(lambda: api("GET", f"/v1/datasets/{again.id}").json(), lambda d: d["status"] != "validating")
    assert d["status"] == "ready", d
    # The task clears its delivery count as it returns, just after writing `ready`: wait for it.
    count = store.key("deliveries", f"dataset:{again.id}:validate")
    wait_for(lambda: {"count": store.r.exists(count)}, lambda c: not c["count"], timeout=10)


# ---------------------------------------------------------------------------------------------------
# Stale partial uploads

STALE_S = 10  # the sweeping worker's DEALREC_STALE_UPLOAD_S: a sweep every second


@pytest.fixture
def sweeper(service_env, store, tmp_path):
    """A worker of the test's own that removes temporary folders unchanged for STALE_S seconds."""
    w = WorkerProcess({**service_env, "DEALREC_STALE_UPLOAD_S": str(STALE_S)}, tmp_path, store)
    w.n = 20  # its own log file
    w.start()
    yield w
    w.stop()


class _SlowUpload:
    """A multipart upload of `files` over a raw HTTP connection, sent piece by piece."""

    def __init__(self, url: str, files: dict[str, bytes]) -> None:
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                 for name, data in files.items()]
        self.body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        self.conn.putrequest("POST", "/v1/datasets")
        for k, v in {**auth("acme"), "Content-Type": f"multipart/form-data; boundary={boundary}",
                     "Content-Length": str(len(self.body))}.items():
            self.conn.putheader(k, v)
        self.conn.endheaders()
        self.sent = 0

    def send(self, n: int) -> None:
        self.conn.send(self.body[self.sent:self.sent + n])
        self.sent = min(len(self.body), self.sent + n)

    def finish(self) -> tuple[int, dict]:
        self.send(len(self.body))
        r = self.conn.getresponse()
        out = r.status, json.loads(r.read())
        self.conn.close()
        return out


def _uploads(tmp: Path) -> set[str]:
    return {p.name for p in tmp.glob("upload-*")} if tmp.is_dir() else set()


def test_stale_partial_uploads_are_swept_and_live_ones_kept(sweeper, start_api_server, settings):
    tmp = settings.data_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    an_hour_ago = time.time() - 3600
    # What an API killed mid-upload leaves: a folder with a partial file, untouched for an hour.
    stale = write_dataset(tmp / "upload-stale" / "raw", {"sequential_train.txt": b"1 2 3\n1 4"})
    # A folder as old, but a file deep inside it was written just now: still in use.
    recent = write_dataset(tmp / "upload-recent" / "raw" / "deep", {"part": b"x"})
    for path in (stale / "sequential_train.txt", stale, stale.parent, recent, recent.parent, recent.parent.parent):
        os.utime(path, (an_hour_ago, an_hour_ago))
    wait_for(lambda: {"left": (tmp / "upload-stale").exists()}, lambda r: not r["left"], timeout=60, interval=0.2)
    assert (tmp / "upload-recent" / "raw" / "deep" / "part").exists()
    shutil.rmtree(tmp / "upload-recent")

    server = start_api_server(DEALREC_STALE_UPLOAD_S=str(STALE_S))
    files = tiny_dataset(n_users=400, seed=43)
    # An upload that takes longer than STALE_S but writes every second is kept, and succeeds.
    before = _uploads(tmp)
    slow = _SlowUpload(server.url, files)
    piece = len(slow.body) // (2 * STALE_S)
    for _ in range(int(1.5 * STALE_S)):
        slow.send(piece)
        time.sleep(1.0)
    assert _uploads(tmp) - before, "the live upload's folder was removed"
    status, body = slow.finish()
    assert status == 202, body

    # One that stalls for longer is removed; its client then gets a 408, not a 500.
    before = _uploads(tmp)
    stalled = _SlowUpload(server.url, files)
    stalled.send(len(stalled.body) // 2)
    folder = wait_for(lambda: {"new": _uploads(tmp) - before}, lambda r: r["new"], timeout=30)["new"]
    wait_for(lambda: {"left": folder & _uploads(tmp)}, lambda r: not r["left"], timeout=60, interval=0.2)
    status, body = stalled.finish()
    assert status == 408 and body["error"]["code"] == "upload_timeout", body


def test_the_folders_of_expired_jobs_and_deleted_datasets_are_swept_while_workers_run(service_env, store,
                                                                                   settings, tmp_path):
    """Not only at a worker's start: a long-running service would keep every job's files forever."""
    w = WorkerProcess({**service_env, "DEALREC_STORAGE_SWEEP_S": "1", "DEALREC_STALE_UPLOAD_S": str(STALE_S)},
                      tmp_path, store)
    w.n = 21  # its own log file
    w.start()
    not_ours = settings.data_dir / "jobs" / "notes"  # not a job id: never touched
    not_ours.mkdir(parents=True, exist_ok=True)
    an_hour_ago = time.time() - 3600

    def orphan(folder: Path, age: float = an_hour_ago) -> Path:
        write_dataset(folder, {"result.json": b"{}"})
        for path in (folder / "result.json", folder):
            os.utime(path, (age, age))
        return folder

    try:
        # Two waves of folders whose records expired (or never existed), unchanged for an hour: the
        # second is made after the first went, so after the worker's start-up sweep.
        for _ in range(2):
            orphans = [orphan(settings.data_dir / "jobs" / new_id("job")),
                       orphan(settings.data_dir / "datasets" / new_id("ds"))]
            wait_for(lambda wave=orphans: {"left": [f.name for f in wave if f.exists()]}, lambda r: not r["left"],
                     timeout=60, interval=0.2)
        # One written just now is kept until it has been still for DEALREC_STALE_UPLOAD_S.
        fresh = orphan(settings.data_dir / "jobs" / new_id("job"), age=time.time())
        time.sleep(3)
        assert fresh.is_dir()
        wait_for(lambda: {"left": fresh.exists()}, lambda r: not r["left"], timeout=60, interval=0.5)
        assert not_ours.is_dir()
    finally:
        w.stop()
        not_ours.rmdir()


# ---------------------------------------------------------------------------------------------------
# Cancel while the LLM loads

FINETUNE = {"epochs": 2, "batch_size": 8, "micro_batch_size": 4, "warmup_steps": 1, "evaluate": None}


@pytest.fixture
def gated_worker(service_env, worker, store, tmp_path):
    """The test's own worker, whose LLM loads wait for the test (gated_worker.py), instead of the
    session's one (started again afterwards)."""
    gate = tmp_path / "gate"
    gate.mkdir()
    worker.stop()
    w = WorkerProcess({**service_env, "DEALREC_TEST_LOAD_GATE": str(gate)}, tmp_path, store,
                      launcher=[sys.executable, str(Path(__file__).with_name("gated_worker.py"))])
    w.n = 30  # its own log file
    try:
        w.start()
        yield gate
    finally:
        (gate / "release").touch()
        w.stop()
        worker.start()


def test_cancel_while_the_llm_loads_does_not_wait_for_it(api, gated_worker, settings):
    gate = gated_worker
    d = upload(api, tiny_dataset(seed=44))
    job = _prune(api, d["id"], budget=10, method="random", seed=8, params={"effort": {"llm": "tiny"}},
                 finetune=FINETUNE)
    wait_for(lambda: {"loading": (gate / "loading").exists()}, lambda r: r["loading"], timeout=180)
    assert api("GET", f"/v1/jobs/{job['id']}").json()["stage"] == "finetune"

    # The load is still held: the answer cannot have waited for it.
    t0 = time.monotonic()
    r = api("POST", f"/v1/jobs/{job['id']}/cancel")
    elapsed = time.monotonic() - t0
    assert r.status_code == 202 and r.json()["status"] == "cancelled", r.text
    assert r.json()["error"]["code"] == "cancelled" and elapsed < 1.0, (elapsed, r.text)
    assert not (settings.data_dir / "jobs" / job["id"]).exists()

    # The load ends; the worker finds the job cancelled, stops before training, takes the next job.
    (gate / "release").touch()
    nxt = wait_job(api, _prune(api, d["id"], budget=3, method="random", seed=9)["id"], timeout=120)
    assert nxt["status"] == "succeeded", nxt
    done = api("GET", f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled", done
    messages = _messages(api, job["id"])
    assert messages[-1] == "job cancelled" and messages.count("job cancelled") == 1, messages
    assert not (settings.data_dir / "jobs" / job["id"]).exists()
