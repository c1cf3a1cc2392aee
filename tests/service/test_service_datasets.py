"""Uploads against the real API, Redis and worker: validation, refusals, archives, auth, tenancy."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

import pytest
from svc_helpers import KEYS, multipart, tiny_dataset, upload

from app.main import create_app
from worker.service.settings import ConfigError, Settings


def _count_datasets(api, tenant="acme") -> int:
    return len(api("GET", "/v1/datasets?limit=200", tenant=tenant).json()["items"])


def _tmp_leftovers(settings) -> list[str]:
    tmp = settings.data_dir / "tmp"
    return sorted(os.listdir(tmp)) if tmp.is_dir() else []


def _stored(api, settings) -> tuple[list[str], list[str], list[str]]:
    """What an upload may leave behind: the tenant's datasets, dataset folders, upload folders."""
    listed = sorted(d["id"] for d in api("GET", "/v1/datasets?limit=200").json()["items"])
    folders = settings.data_dir / "datasets"
    return listed, sorted(os.listdir(folders)) if folders.is_dir() else [], _tmp_leftovers(settings)


def _refused_at_once(api, settings, files: dict[str, bytes]) -> dict:
    """POST the files: a 400 invalid_dataset, and nothing recorded or stored. Returns the error."""
    before = _stored(api, settings)
    r = api("POST", "/v1/datasets", files=multipart(files))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_dataset", err
    assert str(settings.data_dir) not in r.text and "/tmp" not in r.text  # no server path leaks
    assert _stored(api, settings) == before
    return err


def test_health_and_ready(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"]["redis"] is True and r.json()["checks"]["workers"]


def test_upload_becomes_ready_with_statistics(api):
    d = upload(api, tiny_dataset())
    assert d["status"] == "ready", d
    assert d["format"] == "dealrec" and d["statistics"]["users"] == 40 and d["fingerprint"]
    assert {f["name"] for f in d["files"]} >= {"sequential_train.txt", "items.tsv"}
    listed = api("GET", "/v1/datasets").json()["items"]
    assert d["id"] in [x["id"] for x in listed]
    # Another tenant: 404 (the same as an id that never existed), and not in its list.
    r = api("GET", f"/v1/datasets/{d['id']}", tenant="other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert d["id"] not in [x["id"] for x in api("GET", "/v1/datasets", tenant="other").json()["items"]]
    assert api("DELETE", f"/v1/datasets/{d['id']}", tenant="other").status_code == 404


# Errors past the headers: the upload is accepted, and the worker's full validation finds them.
@pytest.mark.parametrize("name, damage, file, line, field", [
    ("bad token", lambda f: {**f, "sequential_train.txt": f["sequential_train.txt"].replace(b"\n2 ", b"\n2 x ", 1)},
     "sequential_train.txt", 2, "item_id"),
    ("unknown item", lambda f: {**f, "sequential_test.txt": f["sequential_test.txt"].replace(b"\n5 ", b"\n5 999 ", 1)},
     "sequential_test.txt", 5, "item_id"),
    ("short row", lambda f: {**f, "items.tsv": f["items.tsv"].replace(b"\tGame number 2\n", b"\n", 1)},
     "items.tsv", 3, "title"),
])
def test_invalid_upload_names_file_line_field(api, name, damage, file, line, field):
    d = upload(api, damage(tiny_dataset()))
    assert d["status"] == "invalid", d
    err = d["errors"][0]
    assert err["file"] == file and err["line"] == line and err["field"] == field, err
    assert file in err["message"] and "/" not in err["file"]  # no server path leaks
    # Pruning it: 409 naming the problem; no job is created.
    r = api("POST", "/v1/prune", json={"dataset_id": d["id"], "budget": 4, "method": "random"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "dataset_not_ready"


LOG = {"interactions.csv": b"user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\n",
       "items.csv": b"item_id,title\ni1,One\ni2,Two\n"}


@pytest.mark.parametrize("name, damage, file, line, field", [
    ("non-UTF-8 title", lambda f: {**f, "items.tsv": f["items.tsv"].replace(b"Game number 3", b"Game \xff 3")},
     "items.tsv", 4, "title"),
    ("non-UTF-8 deep in a sequence file",
     lambda f: {**f, "sequential_train.txt": f["sequential_train.txt"].replace(b"\n38 ", b"\n38 \xe9", 1)},
     "sequential_train.txt", 38, "item_id"),
    ("non-UTF-8 in a file no loader reads", lambda f: {**f, "notes.txt": b"fine\ncaf\xe9\n"}, "notes.txt", 2, None),
    ("items.tsv lacks title", lambda f: {**f, "items.tsv": b"item_id\tsource_item_id\n1\tB1\n"},
     "items.tsv", 1, "title"),
    ("items.tsv with a wrong header", lambda f: {**f, "items.tsv": f["items.tsv"].replace(b"source_item_id", b"asin")},
     "items.tsv", 1, "source_item_id"),
    ("users.tsv with a wrong header", lambda f: {**f, "users.tsv": f["users.tsv"].replace(b"source_user_id", b"name")},
     "users.tsv", 1, "source_user_id"),
    ("first train line", lambda f: {**f, "sequential_train.txt": b"u1 " + f["sequential_train.txt"]},
     "sequential_train.txt", 1, "user_id"),
    ("interaction log lacks item_id",
     lambda f: {**LOG, "interactions.csv": b"user_id,timestamp\nu1,1\nu1,2\n"}, "interactions.csv", 1, "item_id"),
])
def test_bad_encoding_or_header_is_refused_at_once(api, settings, name, damage, file, line, field):
    err = _refused_at_once(api, settings, damage(tiny_dataset()))
    assert (err.get("file"), err.get("line"), err.get("field")) == (file, line, field), err
    assert err["message"].startswith(f"{file}, line {line}"), err


def test_unrecognised_layout_is_refused_at_once(api, settings):
    files = tiny_dataset()
    err = _refused_at_once(api, settings, {"items.tsv": files["items.tsv"], "users.tsv": files["users.tsv"]})
    assert "file" not in err and "sequential_train.txt" in err["message"], err


def test_a_valid_interaction_log_passes_the_precheck(api):
    d = upload(api, LOG)
    assert d["status"] == "ready" and d["format"] == "interactions", d


def test_empty_file_is_refused_at_once(api, settings):
    before = _count_datasets(api)
    files = {**tiny_dataset(), "users.tsv": b""}
    r = api("POST", "/v1/datasets", files=multipart(files))
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_file"
    assert r.json()["error"]["file"] == "users.tsv"
    assert _count_datasets(api) == before and _tmp_leftovers(settings) == []


@pytest.mark.parametrize("name, data", [
    ("scores.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f8'}"),
    ("model.pkl", b"\x80\x04\x95\x00\x00"),
    ("items.tsv", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00"),  # a pickle under a harmless name
])
def test_numpy_and_pickle_refused(api, settings, name, data):
    before = _count_datasets(api)
    r = api("POST", "/v1/datasets", files=multipart({**tiny_dataset(), name: data}))
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_file_type"
    assert _count_datasets(api) == before and _tmp_leftovers(settings) == []


def test_upload_over_the_limit_is_413(api, settings):
    before = _count_datasets(api)
    big = {**tiny_dataset(), "sequential_test.txt": b"1 1\n" * (settings.max_upload_bytes // 4 + 10)}
    r = api("POST", "/v1/datasets", files=multipart(big))
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    assert _count_datasets(api) == before and _tmp_leftovers(settings) == []


def test_file_names_never_become_paths(api, settings):
    files = tiny_dataset()
    parts = [("files", ("../../sequential_train.txt" if n == "sequential_train.txt" else n, io.BytesIO(b), "x"))
             for n, b in files.items()]
    r = api("POST", "/v1/datasets", files=parts)
    assert r.status_code == 202, r.text
    assert "sequential_train.txt" in [f["name"] for f in r.json()["files"]]
    assert not (settings.data_dir.parent / "sequential_train.txt").exists()
    assert not (settings.data_dir / "sequential_train.txt").exists()


def _zip(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)
    return buf.getvalue()


def _tgz(entries: dict[str, bytes], symlinks: dict[str, str] | None = None, hardlinks: dict[str, str] | None = None
         ) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks or {}), (tarfile.LNKTYPE, hardlinks or {})):
            for name, target in links.items():
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, target
                tf.addfile(info)
    return buf.getvalue()


def test_archives_unpack(api):
    inner = {f"games/{k}": v for k, v in tiny_dataset().items()}
    for name, blob in (("games.zip", _zip(inner)), ("games.tar.gz", _tgz(inner))):
        d = upload(api, {name: blob})
        assert d["status"] == "ready", d
        assert d["statistics"]["users"] == 40


@pytest.mark.parametrize("name, blob", [
    ("dotdot.zip", _zip({**tiny_dataset(), "../evil.txt": b"x"})),
    ("abs.tar.gz", _tgz({**tiny_dataset(), "/tmp/evil.txt": b"x"})),
    ("dotdot.tar.gz", _tgz({**tiny_dataset(), "a/../../evil.txt": b"x"})),
    ("symlink.tar.gz", _tgz(tiny_dataset(), symlinks={"extra.tsv": "/etc/passwd"})),
    ("hardlink.tar.gz", _tgz(tiny_dataset(), hardlinks={"extra.tsv": "items.tsv"})),
    ("symlink.zip", _zip(tiny_dataset(), links={"extra.tsv": "/etc/passwd"})),
])
def test_unsafe_archives_refused(api, settings, name, blob):
    before = _count_datasets(api)
    r = api("POST", "/v1/datasets", files=multipart({name: blob}))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "unsafe_archive"
    assert _count_datasets(api) == before and _tmp_leftovers(settings) == []
    assert not (settings.data_dir.parent / "evil.txt").exists()


def _bad_utf8(files: dict[str, bytes]) -> dict[str, bytes]:
    return {**files, "items.tsv": files["items.tsv"].replace(b"Game number 3", b"Game \xff 3")}


@pytest.mark.parametrize("name, pack", [("games.zip", _zip), ("games.tar.gz", _tgz)])
def test_bad_member_of_an_archive_is_refused_at_once(api, settings, name, pack):
    blob = pack({f"games/{k}": v for k, v in _bad_utf8(tiny_dataset()).items()})
    err = _refused_at_once(api, settings, {name: blob})
    assert (err["file"], err["line"], err["field"]) == ("items.tsv", 4, "title"), err
    blob = pack({**tiny_dataset(), "items.tsv": b"item_id\ttitle\n1\tA\n"})
    err = _refused_at_once(api, settings, {name: blob})
    assert (err["file"], err["line"], err["field"]) == ("items.tsv", 1, "source_item_id"), err


def test_archive_bombs_refused(api, settings):
    many = _zip({f"d/f{i}.txt": b"1" for i in range(settings.max_archive_files + 1)})
    r = api("POST", "/v1/datasets", files=multipart({"many.zip": many}))
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_files"
    # Highly compressible: a small upload that unpacks past the limit.
    bomb = _zip({"d/sequential_train.txt": b"1 1\n" * (settings.max_unpacked_bytes // 4 + 1)})
    assert len(bomb) < settings.max_upload_bytes
    r = api("POST", "/v1/datasets", files=multipart({"bomb.zip": bomb}))
    assert r.status_code == 413 and r.json()["error"]["code"] == "archive_too_large"
    assert _tmp_leftovers(settings) == []


def test_auth(client, api):
    r = client.get("/v1/datasets")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.get("/v1/jobs", headers={"Authorization": "Bearer " + KEYS["acme"][:-1] + "X"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = client.post("/v1/prune", json={"dataset_id": "x"}, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    assert api("GET", "/v1/datasets").status_code == 200


def test_refuses_to_start_without_keys(settings):
    with pytest.raises(ConfigError, match="no API keys"):
        create_app(settings.model_copy(update={"api_keys": "", "api_keys_file": None}))
    with pytest.raises(ConfigError, match="shorter than 16"):
        create_app(settings.model_copy(update={"api_keys": "t:short"}))
    app = create_app(settings.model_copy(update={"api_keys": "", "auth_disabled": True}))
    assert app.state.auth.tenant_of(None) == "default"


def test_keys_file(settings, tmp_path):
    path = tmp_path / "keys"
    path.write_text("# tenants\nfilet:filet-key-0123456789abcdef\n")
    app = create_app(settings.model_copy(update={"api_keys": "", "api_keys_file": path}))
    assert app.state.auth.tenant_of("Bearer filet-key-0123456789abcdef") == "filet"


def test_unknown_ids_are_404_json(api):
    for url in ("/v1/datasets/ds_0000000000000000000000", "/v1/datasets/../../etc", "/v1/jobs/job_nope",
                "/v1/jobs/job_0000000000000000000000/events", "/v1/nothing"):
        r = api("GET", url)
        assert r.status_code == 404, url
        assert r.json()["error"]["code"] == "not_found"


def test_settings_from_env_name_the_variable():
    with pytest.raises(ConfigError, match="DEALREC_JOB_TTL_S"):
        Settings.from_env({"DEALREC_JOB_TTL_S": "soon"})
