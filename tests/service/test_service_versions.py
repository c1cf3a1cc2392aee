"""Dataset versions over the API: POST /v1/datasets/{id}/versions appends users to a ready dataset
as a new dataset; a prune on it scores only the new samples' effort and warm-starts its surrogate
from the previous version's."""

from __future__ import annotations

from svc_helpers import multipart, tiny_dataset, upload, wait_for, wait_job

from core.data.synthetic import split_users


def _extend(api, dataset_id: str, files: dict[str, bytes], tenant: str = "acme"):
    return api("POST", f"/v1/datasets/{dataset_id}/versions", tenant=tenant, files=multipart(files))


def _dealrec_job(api, dataset_id: str, **extra) -> dict:
    body = {"dataset_id": dataset_id, "budget": 8, "method": "dealrec", "seed": 2,
            "params": {"effort": {"llm": "tiny"}, "surrogate": {"epochs": 6}}, **extra}
    r = api("POST", "/v1/prune", json=body)
    assert r.status_code == 202, r.text
    done = wait_job(api, r.json()["id"], timeout=240)
    assert done["status"] == "succeeded", done
    return done


def test_a_version_rescores_only_its_new_samples_and_warm_starts(api):
    old_files, added = split_users(tiny_dataset(n_users=60, seed=31), 50)
    old = upload(api, old_files)
    assert old["status"] == "ready", old
    first = _dealrec_job(api, old["id"])
    assert first["result"]["effort"]["scored"] == 50
    assert first["result"]["surrogate"]["warm_start"] is False

    r = _extend(api, old["id"], added)
    assert r.status_code == 202, r.text
    v2 = wait_for(lambda: api("GET", f"/v1/datasets/{r.json()['id']}").json(), lambda d: d["status"] != "validating")
    assert v2["status"] == "ready" and v2["parent_id"] == old["id"], v2
    assert api("GET", f"/v1/datasets/{old['id']}").json()["files"] == old["files"], "the old version is unchanged"

    second = _dealrec_job(api, v2["id"])
    res = second["result"]
    assert res["n_samples"] == 60
    assert (res["effort"]["scored"], res["effort"]["from_store"]) == (10, 50), res["effort"]
    assert res["surrogate"]["warm_start"] is True
    cold = _dealrec_job(api, v2["id"], warm_start=False)
    assert cold["result"]["surrogate"]["warm_start"] is False
    assert cold["result"]["effort"]["scored"] == 0


def test_a_version_needs_a_ready_dataset_of_the_tenant_and_appendable_files(api):
    old_files, added = split_users(tiny_dataset(n_users=30, seed=32), 25)
    old = upload(api, old_files)
    assert _extend(api, old["id"], added, tenant="other").status_code == 404
    assert _extend(api, "ds_" + "0" * 22, added).status_code == 404
    r = _extend(api, old["id"], {"notes.bin": b"\x00\x01"})
    assert r.status_code in (400, 415), r.text
    assert "error" in r.json()
    # A bad row is found by the worker's full validation, as for an upload: the version is invalid,
    # its error names the file, line and field, and the old version stays ready.
    r = _extend(api, old["id"], {"sequential_train.txt": b"26 1 x\n"})
    assert r.status_code == 202, r.text
    bad = wait_for(lambda: api("GET", f"/v1/datasets/{r.json()['id']}").json(), lambda d: d["status"] != "validating")
    assert bad["status"] == "invalid", bad
    error = bad["errors"][0]
    assert error["file"] == "sequential_train.txt" and error["line"], error
    assert api("GET", f"/v1/datasets/{old['id']}").json()["status"] == "ready"
