"""The effort stage as shard tasks: any worker on the LLM queue takes any shard, the selection does
not depend on how many there were or who ran them, a killed worker's shard is redone by another, a
cancel stops every shard, and a damaged store segment is recomputed, never read.

These tests stop the session's worker and start two of their own (small shards: DEALREC_EFFORT_
SHARD_TOKENS), then start the session's worker again."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import WorkerProcess
from svc_helpers import tiny_dataset, upload, wait_for, wait_job, write_dataset

from core.config import PruneConfig
from core.data import load_dataset
from core.pipeline import run_prune

SHARD_TOKENS = "4000"  # ~40 tiny-dataset prompts a shard


@pytest.fixture
def pair(service_env, worker, store, tmp_path):
    """Two workers of the test's own (small shards) instead of the session's one."""
    worker.stop()
    workers = [WorkerProcess({**service_env, "DEALREC_EFFORT_SHARD_TOKENS": SHARD_TOKENS}, tmp_path, store)
               for _ in range(2)]
    for i, w in enumerate(workers):
        w.n = 10 + i  # distinct log files
        w.start()
    try:
        yield workers
    finally:
        for w in workers:
            w.stop()
        worker.start()


def _effort_job(api, dataset_id: str, seed: int = 3, budget: int = 15) -> dict:
    body = {"dataset_id": dataset_id, "budget": budget, "method": "effort", "seed": seed,
            "params": {"effort": {"llm": "tiny"}}}
    r = api("POST", "/v1/prune", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def _events(api, job_id: str) -> list[dict]:
    return api("GET", f"/v1/jobs/{job_id}/events?limit=1000").json()["items"]


def _core_effort_selection(tmp_path: Path, files: dict, llm: str, budget: int, seed: int) -> list[str]:
    """The same selection computed by core in one process: no shards, no store."""
    ds = load_dataset(write_dataset(tmp_path / "core-data", files))
    cfg = PruneConfig.model_validate({"seed": seed, "selection": {"method": "effort", "budget": budget, "seed": seed},
                                      "effort": {"llm": llm, "device": "cpu", "processes": 1}})
    res = run_prune(ds, cfg, device="cpu", cache_dir=tmp_path / "core-cache", use_cache=False)
    return [ds.user_ids[int(i)] for i in res.selection.selected]


def _store_segments(settings) -> list[Path]:
    return sorted(settings.cache_root.joinpath("effort-store").rglob("seg-*.npz"))


def test_two_workers_share_the_shards_and_the_selection_is_the_unsharded_one(api, pair, service_env, tmp_path):
    files = tiny_dataset(n_users=400, seed=21)
    d = upload(api, files)
    job = _effort_job(api, d["id"])
    done = wait_job(api, job["id"], timeout=240)
    assert done["status"] == "succeeded", (done, [w.tail() for w in pair])
    effort = done["result"]["effort"]
    assert effort["scored"] == 400 and effort["from_store"] == 0 and effort["shards"] >= 4, effort
    shard_events = [e for e in _events(api, job["id"]) if e["message"].startswith("effort shard")]
    assert len(shard_events) == effort["shards"]
    assert len({e["data"]["worker"] for e in shard_events}) == 2, "both workers took shards"
    llm = service_env["DEALREC_LLMS"].split("=", 1)[1]
    selected = [s["user_id"] for s in api("GET", f"/v1/jobs/{job['id']}/selection").json()["selected"]]
    assert selected == _core_effort_selection(tmp_path, files, llm, 15, 3)

    # The same pool again: every score from the store, no shard at all.
    again = wait_job(api, _effort_job(api, d["id"], seed=4)["id"], timeout=120)
    assert again["result"]["effort"]["scored"] == 0 and again["result"]["effort"]["from_store"] == 400, again


def test_a_killed_workers_shard_is_redone_by_the_other(api, pair, settings):
    files = tiny_dataset(n_users=1200, seed=22)
    d = upload(api, files)
    before = len(_store_segments(settings))
    job = _effort_job(api, d["id"], seed=5)
    wait_for(lambda: api("GET", f"/v1/jobs/{job['id']}").json(),
             lambda j: j["stage"] == "effort" and any(e["message"].startswith("effort shard")
                                                      for e in _events(api, job["id"])), timeout=180)
    victim, survivor = pair
    victim.kill()
    done = wait_job(api, job["id"], timeout=300)
    assert done["status"] == "succeeded", (done, survivor.tail())
    assert done["result"]["effort"]["scored"] == 1200
    assert len(_store_segments(settings)) > before
    # Every shard finished (the killed one on the survivor), and what the killed worker had stored
    # was kept: the shards together scored the pool give or take one shard, never twice over.
    shard_events = [e for e in _events(api, job["id"]) if e["message"].startswith("effort shard")]
    assert len({e["data"]["shard"] for e in shard_events}) == done["result"]["effort"]["shards"]
    scored = sum(e["data"]["scored"] for e in shard_events)
    biggest = max(e["data"]["samples"] for e in shard_events)
    assert abs(scored - 1200) <= biggest, (scored, biggest)


def test_cancel_stops_every_shard(api, pair, settings):
    d = upload(api, tiny_dataset(n_users=1500, seed=23))
    job = _effort_job(api, d["id"], seed=6)
    wait_for(lambda: api("GET", f"/v1/jobs/{job['id']}").json(),
             lambda j: j["stage"] == "effort" and j["progress"] > 0.05, timeout=180)
    t0 = time.monotonic()
    assert api("POST", f"/v1/jobs/{job['id']}/cancel").status_code == 202
    done = wait_job(api, job["id"], timeout=30)
    assert done["status"] == "cancelled" and time.monotonic() - t0 < 15, done
    # Within one batch every shard has stopped: the store no longer grows.
    time.sleep(3)
    settled = len(_store_segments(settings))
    time.sleep(4)
    assert len(_store_segments(settings)) == settled


def test_a_damaged_store_segment_is_scored_again_never_read(api, pair, settings, tmp_path, service_env):
    files = tiny_dataset(n_users=200, seed=24)
    d = upload(api, files)
    first = wait_job(api, _effort_job(api, d["id"], seed=7)["id"], timeout=180)
    assert first["status"] == "succeeded"
    segment = max(_store_segments(settings), key=lambda p: p.stat().st_mtime)
    import numpy as np

    with np.load(segment) as z:
        n_damaged = int(z["keys"].shape[0])
    raw = bytearray(segment.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    segment.write_bytes(bytes(raw))
    # The whole-pool entries go too (as after a cache clean-up): the next job reads the store.
    for entry in settings.cache_root.glob("effort-*"):
        if entry.name != "effort-store":
            shutil.rmtree(entry)
    second = wait_job(api, _effort_job(api, d["id"], seed=7, budget=16)["id"], timeout=180)
    assert second["status"] == "succeeded", second
    assert second["result"]["effort"]["scored"] == n_damaged, (n_damaged, second["result"]["effort"])
    assert segment.with_name(segment.name + ".corrupt").exists()
    llm = service_env["DEALREC_LLMS"].split("=", 1)[1]
    selected = [s["user_id"] for s in api("GET", f"/v1/jobs/{second['id']}/selection").json()["selected"]]
    assert selected == _core_effort_selection(tmp_path, files, llm, 16, 7)
