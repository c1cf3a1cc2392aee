"""The optional fine-tuning and evaluation stages through the real API, Redis and Celery worker,
with a tiny random Llama the server offers as `tiny` (DEALREC_LLMS): the LLM stages run as tasks
on the `gpu` queue between and after the `cpu` ones, the adapter downloads and loads, cancel works."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest
from svc_helpers import FAST, tiny_dataset, upload, wait_for, wait_job, write_dataset

from core.config import PruneConfig
from core.data import load_dataset
from core.pipeline import run_prune

FINETUNE = {"epochs": 2, "batch_size": 8, "micro_batch_size": 4, "warmup_steps": 1,
            "evaluate": {"test_users": 6, "num_beams": 2, "max_new_tokens": 6}}


@pytest.fixture(scope="module")
def dataset(api) -> dict:
    d = upload(api, tiny_dataset(seed=11))
    assert d["status"] == "ready", d
    return d


def _prune(api, dataset_id: str, **body):
    r = api("POST", "/v1/prune", json={"dataset_id": dataset_id, **body})
    assert r.status_code == 202, r.text
    return r.json()


def _messages(api, job_id: str) -> list[str]:
    return [e["message"] for e in api("GET", f"/v1/jobs/{job_id}/events?limit=1000").json()["items"]]


def test_finetune_and_evaluate_after_selection(api, dataset, settings, tmp_path):
    job = _prune(api, dataset["id"], budget=10, method="random", seed=3,
                 params={"effort": {"llm": "tiny"}}, finetune=FINETUNE)
    done = wait_job(api, job["id"], timeout=300)
    assert done["status"] == "succeeded", done
    assert done["completed_stages"][-3:] == ["outputs", "finetune", "evaluate"]
    ft, metrics = done["result"]["finetune"], done["result"]["metrics"]
    assert 1 <= ft["epochs_run"] <= 2 and ft["train_samples"] == 10 and ft["recipe"]["lr"] == 1e-4
    assert "path" not in ft["base_model"]  # no server paths
    assert set(metrics) >= {"recall@10", "ndcg@10", "recall@20", "ndcg@50"} and 0 < metrics["users"] <= 6
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if "@" in k)
    assert done["result"]["links"]["adapter"] == f"/v1/jobs/{job['id']}/adapter"
    assert done["stages"]["finetune"]["seconds"] > 0 and done["stages"]["evaluate"]["seconds"] > 0
    # selection on cpu, then the LLM stages handed to the gpu queue.
    assert "job continues on the gpu queue" in _messages(api, job["id"])

    r = api("GET", f"/v1/jobs/{job['id']}/adapter")
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    assert {"adapter/adapter_config.json", "adapter/finetune.json"} <= set(names)
    meta = json.loads((tmp_path / "adapter" / "finetune.json").read_text())
    selected = api("GET", f"/v1/jobs/{job['id']}/selection").json()
    assert meta["n_selected"] == len(selected["selected"]) == 10 and meta["seed"] == 3

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(settings.llm_choices()["tiny"])
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert any("lora_B" in n for n, _ in model.named_parameters())


def test_no_adapter_without_finetune(api, dataset):
    job = wait_job(api, _prune(api, dataset["id"], budget=4, method="random")["id"])
    r = api("GET", f"/v1/jobs/{job['id']}/adapter")
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_adapter"
    assert "adapter" not in job["result"]["links"]


def test_dealrec_with_llm_stages_on_the_gpu_queue_equals_core(api, dataset, settings, tmp_path):
    """cpu (surrogate, influence) -> gpu (effort) -> cpu (selection): each task reads the artifacts
    the one before recorded; the selection equals core's in one process."""
    job = _prune(api, dataset["id"], budget=6, method="dealrec", seed=5,
                 params={**FAST, "strata": 4, "effort": {"llm": "tiny"}})
    done = wait_job(api, job["id"], timeout=300)
    assert done["status"] == "succeeded", done
    assert done["result"]["effort"]["llm"] == "tiny"  # the name, not a server path
    msgs = _messages(api, job["id"])
    assert msgs.count("job continues on the gpu queue") == 1 and msgs.count("job continues on the cpu queue") == 1

    files = tiny_dataset(seed=11)
    ds = load_dataset(write_dataset(tmp_path / "data", files))
    cfg = PruneConfig.model_validate({
        "seed": 5, "selection": {"method": "dealrec", "budget": 6, "seed": 5, "strata": 4},
        "surrogate": FAST["surrogate"], "influence": FAST["influence"],
        "effort": {"llm": settings.llm_choices()["tiny"], "device": "cpu"}})
    res = run_prune(ds, cfg, device="cpu", cache_dir=tmp_path / "cache", use_cache=False)
    got = api("GET", f"/v1/jobs/{job['id']}/selection").json()
    assert [s["user_id"] for s in got["selected"]] == [ds.user_ids[int(i)] for i in res.selection.selected]


def test_cancel_during_finetune(api, dataset, settings):
    slow = {**FINETUNE, "epochs": 500, "patience": 500, "batch_size": 1, "micro_batch_size": 1}
    job = _prune(api, dataset["id"], budget=20, method="random", seed=8, params={"effort": {"llm": "tiny"}},
                 finetune=slow)
    wait_for(lambda: api("GET", f"/v1/jobs/{job['id']}").json(), lambda j: j["stage"] == "finetune", timeout=120)
    time.sleep(1.0)
    t0 = time.monotonic()
    assert api("POST", f"/v1/jobs/{job['id']}/cancel").status_code == 202
    done = wait_job(api, job["id"], timeout=30)
    assert done["status"] == "cancelled" and time.monotonic() - t0 < 15, done
    assert not Path(settings.data_dir, "jobs", job["id"]).exists()
    # The worker takes the next job.
    nxt = wait_job(api, _prune(api, dataset["id"], budget=3, method="random")["id"])
    assert nxt["status"] == "succeeded"


def test_an_evaluation_whose_worker_died_resumes_from_its_journal(api, dataset, settings, worker):
    """The worker is SIGKILLed in the middle of the evaluation's generation: the next delivery goes on
    after the batches the journal holds (beside the job's adapter), the journal is gone once the job
    succeeded, and the metrics are those of the same job run without interruption."""
    slow = {**FINETUNE, "evaluate": {"num_beams": 4, "max_new_tokens": 256}}  # every test user, long beams
    body = {"budget": 10, "method": "random", "seed": 5, "params": {"effort": {"llm": "tiny"}}, "finetune": slow}
    job = _prune(api, dataset["id"], **body)
    journal = Path(settings.data_dir, "jobs", job["id"], "adapter.evaluate.partial.jsonl")
    wait_for(lambda: len(journal.read_text().splitlines()) if journal.is_file() else 0, lambda n: n >= 3,
             timeout=300, interval=0.05)  # the header and two batches
    worker.kill()
    done_before = len([x for x in journal.read_text().splitlines()[1:] if _whole_json(x)])  # batches recorded
    worker.start()
    done = wait_job(api, job["id"], timeout=300)
    assert done["status"] == "succeeded", done
    assert not journal.exists()
    log = worker.log.read_text(errors="replace")
    assert "resuming after" in log and f"after {4 * done_before} finished prompts" in log, log[-3000:]
    again = wait_job(api, _prune(api, dataset["id"], **body)["id"], timeout=300)
    assert again["status"] == "succeeded", again
    assert again["result"]["metrics"] == done["result"]["metrics"]


def _whole_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False  # cut short by the kill
    return True


@pytest.mark.parametrize("body, field", [
    ({"finetune": {"epochs": 0}}, "finetune.epochs"),
    ({"finetune": {"micro_batch_size": 9, "batch_size": 4}}, "micro_batch_size"),
    ({"finetune": {"lr": -1}}, "finetune.lr"),
    ({"finetune": {"evaluate": {"num_beams": 0}}}, "finetune.evaluate.num_beams"),
    ({"finetune": {"recipe": 1}}, "finetune.recipe"),
])
def test_finetune_params_are_validated(api, dataset, body, field):
    r = api("POST", "/v1/prune", json={"dataset_id": dataset["id"], "budget": 4, "method": "random", **body})
    assert r.status_code == 422, r.text
    assert field in json.dumps(r.json())
