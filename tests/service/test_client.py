"""The Python client (dealrec_client) and `dealrec remote prune` against the real service: the API as
a server process, a real Celery worker, Redis. No mocks: retries are counted with httpx's event hooks
on a real server whose Redis is stopped, and on a port where nothing listens."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from svc_helpers import FAST, KEYS, free_port, run_dealrec, tiny_dataset, write_dataset

from dealrec_client import (
    APIConnectionError,
    Client,
    InvalidDatasetError,
    JobFailedError,
    NotFoundError,
    ServiceUnavailableError,
    UnprocessableEntityError,
    WaitTimeoutError,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def acme(api_server, worker):
    with Client(api_server.url, KEYS["acme"]) as c:
        yield c


@pytest.fixture(scope="module")
def dataset(acme, tmp_path_factory):
    return acme.datasets.upload(write_dataset(tmp_path_factory.mktemp("client-data"), tiny_dataset()),
                                name="tiny")


def test_whole_flow(acme, dataset, tmp_path, capsys):
    assert dataset.status == "ready" and dataset.statistics["users"] == 40 and dataset.name == "tiny"
    job = acme.prune(dataset, budget=8, method="influence", seed=3, params=FAST).wait(timeout=120, progress=True)
    assert job.status == "succeeded" and job.progress == 1.0
    assert "succeeded" in capsys.readouterr().err  # the progress line (not a terminal here: one line per stage)

    ids = job.selection()
    doc = job.selection("json")
    assert ids == [s["user_id"] for s in doc["selected"]] and len(ids) == 8 and doc["seed"] == 3
    rows = job.scores()
    assert len(rows) == 40 and sum(r["selected"] for r in rows) == 8
    assert isinstance(rows[0]["influence"], float) and rows[0]["effort"] is None
    assert {r["user_id"] for r in rows if r["selected"]} == set(ids)
    assert job.diagnostics()["n_selected"] == 8
    messages = [e["message"] for e in job.events()]
    assert messages[0] == "job queued" and messages[-1] == "job succeeded"

    paths = job.download_outputs(tmp_path / "out")
    assert set(paths) == {"selection.json", "selection.csv", "scores.csv", "bigrec_train.jsonl", "diagnostics.json"}
    assert paths["selection.csv"].read_text().splitlines() == ["user_id", *ids]
    assert len(paths["bigrec_train.jsonl"].read_text().splitlines()) == 8

    assert job.id in [j.id for j in acme.jobs.list(status="succeeded")]
    assert acme.jobs.get(job.id).raw["result"]["n_selected"] == 8
    assert dataset.id in [d.id for d in acme.datasets.list()]
    assert job.cancel().status == "succeeded"  # a finished job is left as it is


def test_create_sends_an_idempotency_key(acme, dataset):
    seen: list[str | None] = []
    http = httpx.Client(base_url=acme.base_url, event_hooks={"request": [
        lambda r: seen.append(r.headers.get("idempotency-key"))]})
    with Client(acme.base_url, KEYS["acme"], http_client=http) as c:
        a = c.jobs.create(dataset.id, budget=4, method="random", idempotency_key="pipeline-step-42")
        b = c.jobs.create(dataset.id, budget=4, method="random", idempotency_key="pipeline-step-42")
        fresh = c.jobs.create(dataset.id, budget=4, method="random")
        fresh.wait(timeout=60)
    assert a.id == b.id != fresh.id
    assert seen[:2] == ["pipeline-step-42"] * 2 and seen[2] and len(seen[2]) == 32


def test_another_tenants_job_is_not_found(acme, api_server, dataset):
    job = acme.jobs.create(dataset, budget=4, method="random").wait(timeout=60)
    with Client(api_server.url, KEYS["other"]) as other:
        with pytest.raises(NotFoundError) as info:
            other.jobs.get(job.id)
        assert info.value.status_code == 404 and info.value.code == "not_found"
        assert info.value.message == f"job {job.id} not found"
        with pytest.raises(NotFoundError):
            other.datasets.get(dataset.id)
        with pytest.raises(NotFoundError):
            other.jobs.create(dataset, budget=4, method="random")


def test_parameter_errors_are_typed(acme, dataset):
    with pytest.raises(UnprocessableEntityError) as info:
        acme.jobs.create(dataset, budget=4, method="random", params={"strata": 0})
    assert info.value.code == "invalid_request" and info.value.field == "params.strata"


def test_wait_honours_its_timeout(acme, dataset):
    slow = {"surrogate": {"epochs": 200, "patience": 1000}, "influence": {"lissa_steps": 5000}}
    job = acme.jobs.create(dataset, budget=8, method="influence", seed=11, params=slow)
    t0 = time.monotonic()
    with pytest.raises(WaitTimeoutError):
        job.wait(timeout=1.0, poll_interval=0.2)
    assert 1.0 <= time.monotonic() - t0 < 4.0
    assert not job.done
    job.cancel()
    with pytest.raises(JobFailedError) as info:
        job.wait(timeout=60, poll_interval=0.2)
    assert info.value.status == "cancelled"
    assert job.wait(timeout=5, check=False).status == "cancelled"


def test_malformed_upload_is_a_typed_error(acme):
    files = tiny_dataset()
    with pytest.raises(InvalidDatasetError) as info:  # refused at once (400)
        acme.datasets.upload({**files, "items.tsv": b"item_id\tsource_item_id\n1\tB1\n"})
    assert (info.value.status_code, info.value.file, info.value.line, info.value.field) == (400, "items.tsv", 1,
                                                                                             "title")
    bad = {**files, "sequential_train.txt": files["sequential_train.txt"].replace(b"\n2 ", b"\n2 x ", 1)}
    with pytest.raises(InvalidDatasetError) as info:  # found by the worker's validation
        acme.datasets.upload(bad)
    assert (info.value.file, info.value.line, info.value.field) == ("sequential_train.txt", 2, "item_id")
    assert info.value.status_code is None and info.value.errors


def test_idempotent_calls_are_retried_on_503_and_connection_errors(start_api_server, tmp_path):
    sent: list[str] = []
    hooks = {"request": [lambda r: sent.append(r.method)]}
    # Nothing listens on this port: connection refused, retried, then the typed error.
    nowhere = f"http://127.0.0.1:{free_port()}"
    with Client(nowhere, "k", max_retries=2, backoff=0.01,
                http_client=httpx.Client(event_hooks=hooks, base_url=nowhere)) as c, \
            pytest.raises(APIConnectionError):
        c.jobs.list()
    assert sent == ["GET"] * 3
    # A server whose Redis does not answer: 503 with Retry-After; GET retried, an upload is not.
    server = start_api_server(DEALREC_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                              DEALREC_DATA_DIR=str(tmp_path / "data"))
    sent.clear()
    with Client(server.url, KEYS["acme"], max_retries=1, backoff=0.01,
                http_client=httpx.Client(event_hooks=hooks, base_url=server.url, timeout=60)) as c:
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailableError) as info:
            c.jobs.get("job_0000000000000000000000")
        assert info.value.code == "store_unavailable" and time.monotonic() - t0 >= 4  # Retry-After: 5
        assert sent == ["GET", "GET"]
        sent.clear()
        with pytest.raises(ServiceUnavailableError):
            c.datasets.upload(tiny_dataset(), wait=False)
        assert sent == ["POST"]


def _dealrec(*args: str) -> subprocess.CompletedProcess:
    r = run_dealrec(*args)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("method, extra", [("influence", ["--epochs", "2"]), ("random", [])])
def test_remote_prune_writes_what_prune_writes(api_server, worker, tmp_path, method, extra):
    data = write_dataset(tmp_path / "data", tiny_dataset(n_users=50, seed=4))
    common = ["--data", str(data), "--method", method, "--budget", "0.2", "--seed", "5", "--no-progress", *extra]
    _dealrec("prune", *common, "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "cli"))
    r = _dealrec("remote", "prune", "--url", api_server.url, "--key", KEYS["acme"], *common,
                 "--out", str(tmp_path / "remote"))
    assert "selected 10 of 50 samples" in r.stdout
    cli, remote = tmp_path / "cli", tmp_path / "remote"
    assert sorted(p.name for p in remote.iterdir()) == sorted(p.name for p in cli.iterdir())
    for name in ("selection.csv", "bigrec_train.jsonl", "scores.csv", "diagnostics.json"):
        assert (remote / name).read_bytes() == (cli / name).read_bytes(), name
    a, b = (json.loads((d / "selection.json").read_text()) for d in (cli, remote))
    for key in ("method", "budget", "seed", "dataset_fingerprint", "n_samples", "notes", "selected"):
        assert a[key] == b[key], key
    for section in ("selection", "surrogate", "influence"):
        assert a["params"][section] == b["params"][section], section


def test_remote_prune_reports_a_bad_dataset(api_server, worker, tmp_path):
    files = tiny_dataset()
    data = write_dataset(tmp_path / "data", {**files, "items.tsv": b"item_id\tsource_item_id\n1\tB1\n"})
    r = run_dealrec("remote", "prune", "--url", api_server.url, "--key", KEYS["acme"], "--data", str(data),
                    "--budget", "4", "--out", str(tmp_path / "out"), timeout=120)
    assert r.returncode == 2 and "items.tsv, line 1" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_client_loads_neither_torch_nor_core():
    code = "import sys, dealrec_client; print(any(m.split('.')[0] in ('torch', 'core') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr



# The tiny random Llama the test server offers as `tiny`: effort, fine-tuning and evaluation in seconds.
TINY_FINETUNE = {"epochs": 1, "batch_size": 8, "micro_batch_size": 4, "warmup_steps": 1,
                 "evaluate": {"test_users": 4, "num_beams": 2, "max_new_tokens": 6}}


def test_dealrec_job_with_finetuning_and_its_adapter(acme, dataset, tmp_path):
    job = acme.jobs.create(dataset, budget=8, method="dealrec", seed=1, params={**FAST, "effort": {"llm": "tiny"}},
                           finetune=TINY_FINETUNE).wait(timeout=300)
    rows = job.scores()
    assert all(r["effort"] is not None and r["influence"] is not None for r in rows)
    assert job.result["finetune"]["train_samples"] == 8 and "recall@10" in job.result["metrics"]
    folder = job.download_adapter(tmp_path / "adapter")
    assert (folder / "adapter_config.json").is_file() and (folder / "finetune.json").is_file()
    assert json.loads((folder / "finetune.json").read_text())["epochs_run"] == 1
