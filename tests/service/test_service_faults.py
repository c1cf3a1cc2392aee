"""Work that goes wrong on a worker (issue 14): Celery's result backend never holds an exception's
payload, work that kills its worker twice is parked instead of redelivered forever, stale partial
uploads are swept within minutes, and a cancel that arrives while the LLM loads does not wait for it."""

from __future__ import annotations

from svc_helpers import FAST, tiny_dataset, upload, wait_for, wait_job

from worker.celery_app import TASK_VALIDATE, make_celery


def _prune(api, dataset_id: str, **body) -> dict:
    r = api("POST", "/v1/prune", json={"dataset_id": dataset_id, **body})
    assert r.status_code == 202, r.text
    return r.json()


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
