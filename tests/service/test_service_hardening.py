"""Inputs that once answered 500 or were refused whole (issue 14): users without a training sample,
an `after` past Redis's range, non-finite numbers in every float field of a request, JSON nested
thousands deep in a data file, and values too long to echo."""

from __future__ import annotations

import io
import json
import typing
import zipfile
from pathlib import Path

import pytest
from pydantic import BaseModel

from tests.service.svc_helpers import FAST, multipart, tiny_dataset, upload, wait_job
from worker.service.requests import PruneRequest

JSON = {"Content-Type": "application/json"}


# ---------------------------------------------------------------------------------------------------
# Users without a training sample (item 5)

def _blank_training_lines(files: dict[str, bytes], users: tuple[int, ...]) -> dict[str, bytes]:
    lines = files["sequential_train.txt"].decode().splitlines()
    lines = [line.split()[0] if int(line.split()[0]) in users else line for line in lines]
    return {**files, "sequential_train.txt": ("\n".join(lines) + "\n").encode()}


def _late_users_log() -> dict[str, bytes]:
    """30 users early, three whose interactions all come after 80 % of the log (chrono: no sample)."""
    rows = [(f"u{u}", f"i{(u + j) % 20}", j * 100 + u) for u in range(30) for j in range(5)]
    rows += [(f"late{u}", f"i{u}", 1000 + u * 10 + j) for u in range(3) for j in range(2)]
    log = "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)
    items = "item_id,title\n" + "".join(f"i{i},Game number {i}\n" for i in range(20))
    return {"interactions.csv": log.encode(), "items.csv": items.encode()}


@pytest.mark.parametrize("layout", ["dealrec", "csv"])
def test_users_without_a_sample_load_and_are_never_selected(api, layout):
    files = _blank_training_lines(tiny_dataset(), (2, 17, 33)) if layout == "dealrec" else _late_users_log()
    d = upload(api, files)
    assert d["status"] == "ready", d
    stats = d["statistics"]
    assert stats["users_without_training_sample"] == 3 and stats["samples"] == stats["users"] - 3
    assert "3 of" in stats["notes"][0]
    for method in ("random", "influence"):
        r = api("POST", "/v1/prune", json={"dataset_id": d["id"], "budget": 1000, "method": method, "params": FAST})
        assert r.status_code == 202, r.text
        job = wait_job(api, r.json()["id"])
        assert job["status"] == "succeeded", job
        sel = api("GET", f"/v1/jobs/{job['id']}/selection", params={"format": "json"}).json()
        # a budget above the pool takes every sample (influence: those left after the hard prune), only those
        assert sel["n_samples"] == stats["samples"] and max(s["index"] for s in sel["selected"]) < stats["samples"]
        assert len(sel["selected"]) == stats["samples"] - (0 if method == "random" else stats["samples"] // 10)


# ---------------------------------------------------------------------------------------------------
# Three inputs that answered 500 (item 3)

def test_events_after_beyond_any_id_is_422(api):
    d = upload(api, tiny_dataset())
    job = api("POST", "/v1/prune", json={"dataset_id": d["id"], "method": "random", "budget": 5}).json()
    r = api("GET", f"/v1/jobs/{job['id']}/events", params={"after": "99999999999999999999"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "after", r.text
    r = api("GET", f"/v1/jobs/{job['id']}/events", params={"after": str(2**53)})
    assert r.status_code == 200 and r.json()["items"] == [], r.text


@pytest.mark.parametrize("budget", ["Infinity", "-Infinity", "NaN", "1e308", "1e10"])
def test_non_finite_or_absurd_budget_is_422(api, budget):
    r = api("POST", "/v1/prune", content=f'{{"dataset_id": "ds_x", "budget": {budget}}}', headers=JSON)
    assert r.status_code == 422 and r.json()["error"]["field"] == "budget", r.text


def _deep_log(first: bool) -> dict[str, bytes]:
    good = b'{"user_id": "u", "item_id": "i1", "timestamp": 1}\n'
    deep = b"[" * 200_000 + b"\n"
    return {"interactions.jsonl": deep + good if first else good + good + deep,
            "items.csv": b"item_id,title\ni1,One\n"}


def test_deeply_nested_json_is_a_data_error(api):
    r = api("POST", "/v1/datasets", files=multipart(_deep_log(first=True)))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["file"], err["line"], err["field"]) == ("invalid_dataset", "interactions.jsonl", 1,
                                                                     "user_id")
    assert "nested" in err["message"] and len(r.content) < 2000
    d = upload(api, _deep_log(first=False))  # past the upload check: the worker's validation says the same
    assert d["status"] == "invalid", d
    err = d["errors"][0]
    assert (err["code"], err["file"], err["line"], err["field"]) == ("invalid_dataset", "interactions.jsonl", 3,
                                                                     "user_id")


# ---------------------------------------------------------------------------------------------------
# Every float field of the request: Infinity and NaN are 422 (item 4)

def _model_of(annotation) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _has_float(annotation) -> bool:
    return annotation is float or any(_has_float(a) for a in typing.get_args(annotation))


def float_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths (by alias) of every field holding a float, nested models walked."""
    out = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name,)
        nested = _model_of(field.annotation)
        if nested is not None:
            out += float_fields(nested, key)
        elif _has_float(field.annotation):
            out.append(key)
    return out


FLOAT_FIELDS = float_fields(PruneRequest)


def test_the_walk_finds_the_known_float_fields():
    found = {".".join(p) for p in FLOAT_FIELDS}
    assert {"budget", "params.lambda", "params.hard_prune", "params.surrogate.lr", "params.surrogate.initializer_range",
            "params.influence.scale", "params.influence.damping", "params.effort.lora_dropout",
            "finetune.lr"} <= found


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN"])
def test_non_finite_numbers_are_422_in_every_float_field(api, value):
    for path in FLOAT_FIELDS:
        body = f'{{"{path[-1]}": {value}}}'
        for key in reversed(path[:-1]):
            body = f'{{"{key}": {body}}}'
        body = '{"dataset_id": "ds_x", ' + body[1:]
        r = api("POST", "/v1/prune", content=body, headers=JSON)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["field"] == ".".join(path), (path, r.text)


# ---------------------------------------------------------------------------------------------------
# Values too long to echo (item 1): errors quote a clipped value, bodies and stored errors stay small

def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _peak_rss_reset(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM); False where the kernel does not let us."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_huge_user_id_gives_a_short_error(api):
    big = b"A" * (2 << 20)
    files = tiny_dataset()
    # in the first line: refused at upload (the line is longer than the loaders read)
    r = api("POST", "/v1/datasets", files=multipart({**files, "sequential_train.txt": big + b" 1 2\n"}))
    assert r.status_code == 400 and len(r.content) < 2000, r.text[:3000]
    assert r.json()["error"]["line"] == 1 and "longer than" in r.json()["error"]["message"]
    # shorter than a line may be, but no id: the value is quoted clipped, with its length
    r = api("POST", "/v1/datasets", files=multipart({**files, "sequential_train.txt": big[:500_000] + b" 1 2\n"}))
    assert r.status_code == 400 and len(r.content) < 2000, r.text[:3000]
    assert "500,000 characters" in r.json()["error"]["message"]
    # further down: the worker's validation says so, briefly, and so does every read of the dataset
    users = files["users.tsv"] + b"41\t" + big + b"\n"
    train = files["sequential_train.txt"].replace(b"\n2 ", b"\n" + big[:300_000] + b" ", 1)
    log = b"user_id,item_id,timestamp\nu1,i1,1\n" + big + b",i1,2\n"
    for damaged in ({**files, "users.tsv": users}, {**files, "sequential_train.txt": train},
                    {"interactions.csv": log, "items.csv": b"item_id,title\ni1,One\n"}):
        d = upload(api, damaged)
        assert d["status"] == "invalid", d
        for path in (f"/v1/datasets/{d['id']}", "/v1/datasets?limit=1"):
            r = api("GET", path)
            assert r.status_code == 200 and len(r.content) < 4000, (path, len(r.content))
    r = api("POST", "/v1/prune", json={"dataset_id": "ds_x", "budget": 5, "A" * (2 << 20): 1})
    assert r.status_code == 422 and len(r.content) < 4000


def test_a_zip_of_nul_bytes_is_refused_and_the_worker_stays_small(api, worker, settings):
    # 64 MiB, or as much as the tests' unpacked-size limit lets through (a larger one is a 413)
    nul = b"\0" * min(64 << 20, settings.max_unpacked_bytes - (1 << 20))
    files = tiny_dataset()
    r = api("POST", "/v1/datasets", files=multipart({"nul.zip": _zip({**files, "sequential_train.txt": nul})}))
    assert r.status_code == 400 and len(r.content) < 2000, r.text[:3000]
    assert r.json()["error"]["file"] == "sequential_train.txt"
    # after a valid first line the upload check passes; the worker's validation refuses it in bounded memory
    pid = worker.proc.pid
    reset = _peak_rss_reset(pid)
    before = _peak_rss(pid)
    blob = _zip({**files, "sequential_train.txt": files["sequential_train.txt"] + nul + b"\n"})
    d = upload(api, {"nul.zip": blob})
    assert d["status"] == "invalid" and len(json.dumps(d)) < 4000, str(d)[:3000]
    assert d["errors"][0]["file"] == "sequential_train.txt" and "longer than" in d["errors"][0]["message"]
    if reset:
        assert _peak_rss(pid) - before < (1 << 30), (before, _peak_rss(pid))
    assert worker.proc.poll() is None
    assert upload(api, files)["status"] == "ready"  # the same worker goes on
