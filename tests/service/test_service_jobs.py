"""Prune jobs through the real API, Redis and Celery worker: results, idempotency, validation,
cancellation, a killed worker, events, metrics."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest
from svc_helpers import FAST, METRICS_TOKEN, tiny_dataset, upload, wait_for, wait_job, write_dataset

from core.config import PruneConfig
from core.data import load_dataset
from core.pipeline import run_prune


@pytest.fixture(scope="module")
def dataset(api) -> dict:
    d = upload(api, tiny_dataset())
    assert d["status"] == "ready", d
    return d


def _prune(api, dataset_id: str, tenant: str = "acme", headers: dict | None = None, **body):
    return api("POST", "/v1/prune", tenant=tenant, json={"dataset_id": dataset_id, **body}, headers=headers or {})


def _selected_ids(doc: dict) -> list[str]:
    return [s["user_id"] for s in doc["selected"]]


def _core_selection(tmp_path, files: dict, method: str, budget: int, seed: int, params: dict) -> list[str]:
    """The same run through core directly (what `dealrec prune` does), without any cache."""
    ds = load_dataset(write_dataset(tmp_path / "core-data", files))
    cfg = PruneConfig.model_validate({"seed": seed, "selection": {"method": method, "budget": budget, "seed": seed},
                                      "surrogate": params.get("surrogate", {}),
                                      "influence": params.get("influence", {})})
    res = run_prune(ds, cfg, device="cpu", cache_dir=tmp_path / "core-cache", use_cache=False)
    return [ds.user_ids[int(i)] for i in res.selection.selected]


def test_prune_influence_end_to_end(api, dataset, tmp_path):
    r = _prune(api, dataset["id"], budget=8, method="influence", seed=3, params=FAST)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and r.headers["location"] == f"/v1/jobs/{job['id']}"
    # Defaults filled in and shown.
    assert job["params"]["selection"]["strata"] == 50 and job["params"]["influence"]["solver"] == "lissa"
    done = wait_job(api, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["finished_at"] and done["started_at"]
    assert done["result"]["n_selected"] == 8 and done["result"]["n_samples"] == 40
    assert set(done["completed_stages"]) >= {"load", "surrogate", "influence", "selection", "outputs"}
    assert done["stages"]["surrogate"]["seconds"] > 0 and done["stages"]["effort"]["skipped"]

    sel = api("GET", done["result"]["links"]["selection"])
    assert sel.status_code == 200 and sel.headers["content-type"].startswith("application/json")
    doc = sel.json()
    assert doc["method"] == "influence" and doc["budget"] == 8 and doc["seed"] == 3
    assert doc["dataset_fingerprint"] == dataset["fingerprint"]
    expected = _core_selection(tmp_path, tiny_dataset(), "influence", 8, 3, FAST)
    assert _selected_ids(doc) == expected

    rows = api("GET", f"/v1/jobs/{job['id']}/selection?format=csv").text.splitlines()
    assert rows[0] == "user_id" and rows[1:] == expected
    scores = list(csv.DictReader(io.StringIO(api("GET", f"/v1/jobs/{job['id']}/scores?format=csv").text)))
    assert len(scores) == 40 and sum(int(s["selected"]) for s in scores) == 8
    lines = api("GET", f"/v1/jobs/{job['id']}/bigrec_train.jsonl").text.splitlines()
    assert len(lines) == 8 and set(json.loads(lines[0])) == {"instruction", "input", "output"}

    events = api("GET", f"/v1/jobs/{job['id']}/events?limit=1000").json()
    ids = [e["id"] for e in events["items"]]
    assert ids == list(range(1, len(ids) + 1)) and not events["has_more"]
    messages = [e["message"] for e in events["items"]]
    assert messages[0] == "job queued" and messages[-1] == "job succeeded"
    assert messages.index("stage surrogate started") < messages.index("stage influence started")
    page = api("GET", f"/v1/jobs/{job['id']}/events?after=2&limit=3").json()
    assert [e["id"] for e in page["items"]] == [3, 4, 5] and page["has_more"] and page["next_after"] == 5

    # Another tenant sees none of it.
    for url in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events", f"/v1/jobs/{job['id']}/selection"):
        assert api("GET", url, tenant="other").status_code == 404
    assert api("POST", f"/v1/jobs/{job['id']}/cancel", tenant="other").status_code == 404
    # A finished job cannot be cancelled.
    r = api("POST", f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_random_with_ratio_budget_and_listing(api, dataset):
    r = _prune(api, dataset["id"], budget=0.1, method="random", seed=1)
    assert r.status_code == 202, r.text
    done = wait_job(api, r.json()["id"])
    assert done["status"] == "succeeded", done
    assert done["params"]["selection"]["budget"] == 4 and done["result"]["n_selected"] == 4
    assert done["stages"]["surrogate"]["skipped"]
    listed = api("GET", "/v1/jobs?status=succeeded&limit=1").json()
    assert len(listed["items"]) == 1 and listed["items"][0]["status"] == "succeeded"
    if listed["next_cursor"]:
        nxt = api("GET", f"/v1/jobs?status=succeeded&limit=1&cursor={listed['next_cursor']}").json()
        assert nxt["items"][0]["id"] < listed["items"][0]["id"]
    assert api("GET", "/v1/jobs", tenant="other").json()["items"] == []


def test_idempotency_key(api, dataset):
    body = {"budget": 5, "method": "random", "seed": 11}
    a = _prune(api, dataset["id"], headers={"Idempotency-Key": "run-42"}, **body)
    b = _prune(api, dataset["id"], headers={"Idempotency-Key": "run-42"}, **body)
    assert a.status_code == 202 and b.status_code == 200, (a.text, b.text)
    assert a.json()["id"] == b.json()["id"] and b.headers["idempotent-replayed"] == "true"
    c = _prune(api, dataset["id"], headers={"Idempotency-Key": "run-42"}, **{**body, "seed": 12})
    assert c.status_code == 409 and c.json()["error"]["code"] == "idempotency_conflict"
    # Keys are per tenant: the other tenant's "run-42" is its own (and cannot see this dataset).
    d = _prune(api, dataset["id"], tenant="other", headers={"Idempotency-Key": "run-42"}, **body)
    assert d.status_code == 404
    assert wait_job(api, a.json()["id"])["status"] == "succeeded"


@pytest.mark.parametrize("body, field", [
    ({"budget": 0}, "budget"),
    ({"budget": 1.5}, "budget"),
    ({"budget": "ten"}, "budget"),
    ({"method": "best"}, "method"),
    ({"seed": -1}, "seed"),
    ({"limit_users": 0}, "limit_users"),
    ({"params": {"lambda": -0.1}}, "params.lambda"),
    ({"params": {"strata": 0}}, "params.strata"),
    ({"params": {"hard_prune": 1.0}}, "params.hard_prune"),
    ({"params": {"surrogate": {"epochs": 0}}}, "params.surrogate.epochs"),
    ({"params": {"surrogate": {"hidden_size": 65}}}, "params.surrogate"),
    ({"params": {"influence": {"solver": "magic"}}}, "params.influence.solver"),
    ({"params": {"effort": {"llm": "/etc/passwd"}}}, "params.effort.llm"),
    ({"params": {"effort": {"device": "cuda"}}}, "params.effort.device"),
    ({"params": {"colour": "red"}}, "params.colour"),
    ({"surprise": 1}, "surprise"),
])
def test_invalid_params_are_422_naming_the_field(api, dataset, body, field):
    before = len(api("GET", "/v1/jobs?limit=200").json()["items"])
    r = _prune(api, dataset["id"], **body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and err["field"].startswith(field), err
    assert len(api("GET", "/v1/jobs?limit=200").json()["items"]) == before


def test_the_direct_solver_past_its_memory_bound_is_422(api, dataset):
    """A dense Hessian of 2 GiB (hidden size 128) is refused before the job exists (core.params.check_direct_solver)."""
    before = len(api("GET", "/v1/jobs?limit=200").json()["items"])
    r = _prune(api, dataset["id"], budget=4, method="influence",
               params={"surrogate": {"hidden_size": 128}, "influence": {"solver": "direct"}})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert (err["code"], err["field"]) == ("invalid_request", "params.influence.solver"), err
    assert "surrogate.hidden_size 128" in err["message"] and "'lissa' or 'cg'" in err["message"], err
    assert len(api("GET", "/v1/jobs?limit=200").json()["items"]) == before


def test_an_influence_parameter_the_surrogate_lacks_is_422(api, dataset):
    """Refused before the job exists, not after its surrogate trained (core.params.check_influence_parameter)."""
    r = _prune(api, dataset["id"], budget=4, method="influence",
               params={"influence": {"parameter": "blocks.9.ffn.fc1"}})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert (err["code"], err["field"]) == ("invalid_request", "params.influence.parameter"), err
    assert "'blocks.9.ffn.fc1' is not a Linear layer" in err["message"], err


def test_missing_dataset_is_404(api):
    r = _prune(api, "ds_0000000000000000000000", budget=4)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# A job slow enough to catch mid-way: the surrogate trains for many epochs (no early stop).
SLOW = {"surrogate": {"epochs": 5000, "eval_every": 5000, "patience": 1}, "influence": {"lissa_steps": 200}}


def test_cancel_running_and_queued_jobs(api, dataset, settings):
    slow = _prune(api, dataset["id"], budget=4, method="influence", params=SLOW).json()
    queued = _prune(api, dataset["id"], budget=4, method="random", seed=5).json()
    running = wait_for(lambda: api("GET", f"/v1/jobs/{slow['id']}").json(),
                       lambda j: j["status"] == "running" and j["stage"] == "surrogate", timeout=60)
    assert running["status"] == "running"
    # The dataset is in use: not deletable.
    r = api("DELETE", f"/v1/datasets/{dataset['id']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "dataset_in_use"

    r = api("POST", f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    t0 = time.monotonic()
    r = api("POST", f"/v1/jobs/{slow['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    done = wait_job(api, slow["id"], timeout=20)
    assert done["status"] == "cancelled" and time.monotonic() - t0 < 10, done
    assert done["error"]["code"] == "cancelled"
    assert not settings.data_dir.joinpath("jobs", slow["id"]).exists()
    messages = [e["message"] for e in api("GET", f"/v1/jobs/{slow['id']}/events?limit=1000").json()["items"]]
    assert "cancel requested" in messages and messages[-1] == "job cancelled"

    # The worker goes on with the next job; the cancelled queued one never ran.
    nxt = _prune(api, dataset["id"], budget=4, method="random", seed=6).json()
    assert wait_job(api, nxt["id"], timeout=60)["status"] == "succeeded"
    skipped = api("GET", f"/v1/jobs/{queued['id']}").json()
    assert skipped["status"] == "cancelled" and skipped["started_at"] is None


@pytest.mark.slow
def test_killed_worker_job_resumes_elsewhere(api, worker, tmp_path):
    """SIGKILL the worker once the surrogate is done; a new worker gets the redelivered job, reuses
    the cached surrogate, and the selection equals an uninterrupted, uncached run."""
    d = upload(api, tiny_dataset(seed=7))
    params = {"surrogate": {"epochs": 40, "eval_every": 40}, "influence": {"lissa_steps": 20000}}
    job = _prune(api, d["id"], budget=6, method="influence", seed=2, params=params).json()
    wait_for(lambda: api("GET", f"/v1/jobs/{job['id']}").json(),
             lambda j: j["stage"] == "influence", timeout=120)
    worker.kill()
    at_kill = api("GET", f"/v1/jobs/{job['id']}").json()
    assert at_kill["status"] == "running"
    worker.start()
    done = wait_job(api, job["id"], timeout=240)
    assert done["status"] == "succeeded", (done, worker.tail())
    assert done["attempts"] == 2, done
    # Finished stages are not run again. Usually the kill lands inside influence: the new worker
    # loads the surrogate it finished and computes influence; on a slow machine influence may have
    # finished just before the kill, and then the new worker needs neither.
    assert "influence" not in done["reused_stages"], done
    if "influence" not in at_kill["completed_stages"]:
        assert "surrogate" in done["reused_stages"], (at_kill, done)
    for stage in at_kill["completed_stages"]:
        assert done["stages"][stage] == at_kill["stages"][stage], stage  # timings of the first attempt kept
    events = api("GET", f"/v1/jobs/{job['id']}/events?limit=1000").json()["items"]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert any(e["message"] == "job resumed after its worker stopped" for e in events)
    doc = api("GET", f"/v1/jobs/{job['id']}/selection").json()
    assert _selected_ids(doc) == _core_selection(tmp_path, tiny_dataset(seed=7), "influence", 6, 2, params)


def test_delete_dataset_when_idle(api):
    d = upload(api, tiny_dataset(n_users=12))
    job = _prune(api, d["id"], budget=3, method="random").json()
    wait_job(api, job["id"])
    assert api("DELETE", f"/v1/datasets/{d['id']}").status_code == 204
    assert api("GET", f"/v1/datasets/{d['id']}").status_code == 404
    # Its finished job and results stay readable.
    assert api("GET", f"/v1/jobs/{job['id']}/selection").status_code == 200


def test_metrics(client, api, dataset):
    job = _prune(api, dataset["id"], budget=3, method="random").json()
    wait_job(api, job["id"])
    text = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    assert "# TYPE dealrec_jobs gauge" in text
    assert 'dealrec_jobs_finished_total{status="succeeded"}' in text
    assert 'dealrec_queue_depth{queue="cpu"}' in text and 'dealrec_stage_duration_seconds_count{stage="load"}' in text
    assert "dealrec_store_up 1" in text


def test_stalled_running_job_is_requeued(api, dataset, store):
    """A running job that no worker holds and no queue carries (its worker died and its message is
    gone) is sent again by a worker's reaper and finishes."""
    from worker.service.jobstore import new_id
    from worker.service.records import JobRecord
    from worker.service.requests import PruneRequest

    req = PruneRequest.model_validate({"dataset_id": dataset["id"], "budget": 5, "method": "random", "seed": 4})
    job = JobRecord(id=new_id("job"), tenant="acme", dataset_id=dataset["id"],
                    request=req.model_dump(mode="json", by_alias=True))
    job, created = store.create_job(job)
    assert created
    # As if a worker had started it and died after its message was acknowledged: no task anywhere.
    store.transition(job.id, "running", worker="ghost:1", attempts=1, started_at="2026-01-01T00:00:00+00:00",
                     updated_at="2026-01-01T00:00:00+00:00")
    done = wait_job(api, job.id, timeout=90)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    messages = [e["message"] for e in api("GET", f"/v1/jobs/{job.id}/events?limit=1000").json()["items"]]
    assert "job resumed after its worker stopped" in messages
    normal = wait_job(api, _prune(api, dataset["id"], budget=5, method="random", seed=4).json()["id"])
    assert api("GET", f"/v1/jobs/{job.id}/selection").json()["selected"] == \
        api("GET", f"/v1/jobs/{normal['id']}/selection").json()["selected"]


def test_a_handoff_whose_task_was_never_sent_is_sent_by_the_reaper(api, dataset, store):
    """The hand-off gap: a task recorded the job's hand-off to the next queue and its worker died
    before sending that task. The reaper sends it again (within its bounded wait), but leaves alone
    a hand-off whose task did reach the broker (it waits in its queue, however long)."""
    from worker.service.jobstore import new_id
    from worker.service.records import JobRecord
    from worker.service.requests import PruneRequest

    jobs = []
    for seed in (5, 6):
        req = PruneRequest.model_validate({"dataset_id": dataset["id"], "budget": 5, "method": "random",
                                           "seed": seed})
        job, _ = store.create_job(JobRecord(id=new_id("job"), tenant="acme", dataset_id=dataset["id"],
                                            request=req.model_dump(mode="json", by_alias=True)))
        jobs.append(job)
    unsent, sent = jobs
    old = "2026-01-01T00:00:00+00:00"
    # Both as left by a first task that finished `load` and handed the job on; no message anywhere.
    store.transition(unsent.id, "running", worker="ghost:1", attempts=1, started_at=old, updated_at=old,
                     completed_stages=["load"], handoff="cpu", handoff_id="t1", handoff_sent=False)
    store.transition(sent.id, "running", worker="ghost:2", attempts=1, started_at=old, updated_at=old,
                     completed_stages=["load"], handoff="cpu", handoff_id="t2", handoff_sent=True)
    done = wait_job(api, unsent.id, timeout=90)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert "job handed on again: its worker stopped before sending it" in _messages_of(api, unsent.id)
    waiting = store.get_job(sent.id)
    assert waiting.status == "running" and waiting.handoff_id == "t2" and waiting.worker == "ghost:2"
    assert not any("again" in m or "resumed" in m for m in _messages_of(api, sent.id))
    assert api("POST", f"/v1/jobs/{sent.id}/cancel").json()["status"] == "cancelled"


def test_confirming_a_handoff_that_moved_on_writes_nothing(store, dataset):
    from worker.service.handoffs import confirm_handoff, record_handoff
    from worker.service.jobstore import new_id
    from worker.service.records import JobRecord

    job, _ = store.create_job(JobRecord(id=new_id("job"), tenant="acme", dataset_id=dataset["id"]))
    store.transition(job.id, "running", worker="w:1", attempts=1)
    first = record_handoff(store, job.id, "gpu", allowed=["running"])
    second = record_handoff(store, job.id, "cpu", allowed=["running"])  # the job moved on meanwhile
    assert not confirm_handoff(store, job.id, first) and not store.get_job(job.id).handoff_sent
    assert confirm_handoff(store, job.id, second) and store.get_job(job.id).handoff_sent
    store.transition(job.id, "cancelled")


def test_cancel_job_waiting_between_tasks_is_immediate(api, dataset, store, settings):
    """A running job handed to another queue (no worker holds it yet) is cancelled at once."""
    from worker.service.jobstore import new_id
    from worker.service.records import JobRecord
    from worker.service.requests import PruneRequest

    req = PruneRequest.model_validate({"dataset_id": dataset["id"], "budget": 5, "method": "random"})
    job, _ = store.create_job(JobRecord(id=new_id("job"), tenant="acme", dataset_id=dataset["id"],
                                        request=req.model_dump(mode="json", by_alias=True)))
    store.transition(job.id, "running", worker="w:1", attempts=1, handoff="gpu", completed_stages=["load"])
    settings.data_dir.joinpath("jobs", job.id).mkdir(parents=True)  # partial outputs of the first task
    r = api("POST", f"/v1/jobs/{job.id}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled", r.text
    assert not settings.data_dir.joinpath("jobs", job.id).exists()
    assert _messages_of(api, job.id)[-1] == "job cancelled"


def _messages_of(api, job_id: str) -> list[str]:
    return [e["message"] for e in api("GET", f"/v1/jobs/{job_id}/events?limit=1000").json()["items"]]
