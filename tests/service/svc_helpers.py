"""Shared by the service tests: tenants' keys, a tiny DEALRec-layout dataset, upload and polling helpers."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Callable
from core.data.synthetic import dealrec_layout_files

KEYS = {"acme": "acme-key-0123456789abcdef", "other": "other-key-0123456789abcdef"}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant in KEYS else {}


def tiny_dataset(n_users: int = 40, n_items: int = 30, seed: int = 0) -> dict[str, bytes]:
    return dealrec_layout_files(n_users, n_items, seed)


def write_dataset(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def multipart(files: dict[str, bytes]) -> list:
    return [("files", (name, io.BytesIO(data), "application/octet-stream")) for name, data in files.items()]


def wait_for(fetch: Callable[[], dict], done: Callable[[dict], bool], timeout: float = 60.0,
             interval: float = 0.1) -> dict:
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        last = fetch()
        if done(last):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s; last state: {last}")


def upload(api, files: dict[str, bytes], tenant: str = "acme", wait: bool = True, timeout: float = 60.0) -> dict:
    r = api("POST", "/v1/datasets", tenant=tenant, files=multipart(files))
    assert r.status_code == 202, r.text
    body = r.json()
    if not wait:
        return body
    return wait_for(lambda: api("GET", f"/v1/datasets/{body['id']}", tenant=tenant).json(),
                    lambda d: d["status"] != "validating", timeout)


def wait_job(api, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 90.0,
             tenant: str = "acme") -> dict:
    return wait_for(lambda: api("GET", f"/v1/jobs/{job_id}", tenant=tenant).json(),
                    lambda j: j.get("status") in statuses, timeout, interval=0.1)


# Fast parameters: a 2-epoch surrogate, a short LiSSA; no LLM.
FAST = {"surrogate": {"epochs": 2, "eval_every": 1}, "influence": {"lissa_steps": 200}}
