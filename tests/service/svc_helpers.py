"""Shared by the service tests: tenants' keys, a tiny DEALRec-layout dataset, upload and polling helpers,
and the API as a real HTTP server process."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import httpx

from core.data.synthetic import dealrec_layout_files

ROOT = Path(__file__).resolve().parents[2]

# "watched": a tenant only test_service_ops.py's per-tenant metrics test uses, so its numbers are known.
KEYS = {"acme": "acme-key-0123456789abcdef", "other": "other-key-0123456789abcdef",
        "watched": "watched-key-0123456789abcdef"}
# The scrapers' token of /metrics (DEALREC_METRICS_TOKEN), no tenant's key.
METRICS_TOKEN = "metrics-token-0123456789abcdef"
# The operators' token of /metrics (DEALREC_METRICS_ADMIN_TOKEN): the series per tenant too.
METRICS_ADMIN_TOKEN = "metrics-admin-token-0123456789abcdef"


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


# ---------------------------------------------------------------------------------------------------
# Child processes


def run_dealrec(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`dealrec ARGS` (the service's CLI, `python -m app.cli`) as a user runs it: none of the tests'
    DEALREC_* variables, so the URL and key come from the arguments alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEALREC_")}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, timeout=timeout)


class LoggedProcess(Protocol):
    """A child process whose log tail the failure report shows (see conftest's makereport hook)."""

    name: str

    def tail(self, n: int = 4000) -> str: ...


# Every live server / worker: a failing test's report gets each one's log tail.
LIVE: dict[int, LoggedProcess] = {}


def free_port() -> int:
    """A port free right now. Another process may take it before ours binds it: ApiServer retries."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_tail(path: Path | None, n: int) -> str:
    try:
        return path.read_text(errors="replace")[-n:] if path else ""
    except OSError:
        return ""


class ApiServer:
    """`python -m app.cli serve` (uvicorn) on a free port of 127.0.0.1 as a child process, configured
    only through `env` (DEALREC_* variables), so the API runs exactly as deployed: real sockets, real
    HTTP parsing, its own process and event loop."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "api") -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        self.log_dir = log_dir
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None
        self.url = ""
        self.n = 0

    def start(self, timeout: float = 60.0, attempts: int = 3) -> ApiServer:
        # The port is chosen before uvicorn binds it; a server that exits at once most likely lost
        # that race, so it gets another port (a server that exits for another reason exits again).
        for _ in range(attempts):
            if self._start_once(timeout):
                return self
        LIVE.pop(id(self), None)
        code = self.proc.returncode if self.proc else None
        raise RuntimeError(f"API server exited with {code} ({attempts} tries):\n{self.tail()}")

    def _start_once(self, timeout: float) -> bool:
        """True once /healthz answers 200; False if the process exited; raises on a timeout."""
        self.n += 1
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = self.log_dir / f"{self.name}-{self.n}.log"
        with open(self.log, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                 "--log-level", "info"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        LIVE[id(self)] = self
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0) as probe:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if probe.get("/healthz").status_code == 200:
                        return True
                except httpx.TransportError:  # not listening yet
                    pass
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"API server not answering /healthz after {timeout} s:\n{self.tail()}")

    def client(self, timeout: float = 120.0) -> httpx.Client:
        """An HTTP client for this server. The timeout is generous: a loaded 2-core test machine can
        take seconds to accept a multi-megabyte upload; TestClient had no timeout at all."""
        return httpx.Client(base_url=self.url, timeout=timeout)

    def tail(self, n: int = 4000) -> str:
        return read_tail(self.log, n)

    def stop(self) -> None:
        LIVE.pop(id(self), None)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # uvicorn's graceful shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
