"""With Redis stopped the API answers 503 JSON, and recovers by itself when Redis is back.

Runs its own redis-server on a free port (the shared one is never stopped)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from svc_helpers import auth, multipart, tiny_dataset
from worker.store import connect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    def __init__(self, port: int, folder) -> None:
        self.port, self.folder, self.proc = port, folder, None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                connect(f"redis://127.0.0.1:{self.port}/0").ping()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_down_is_503_and_recovers(settings, tmp_path):
    port = _free_port()
    server = PrivateRedis(port, tmp_path)
    server.start()
    url = f"redis://127.0.0.1:{port}/0"
    app = create_app(settings.model_copy(update={"redis_url": url, "data_dir": tmp_path / "data"}))
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            h = auth("acme")
            assert c.get("/v1/jobs", headers=h).status_code == 200
            server.stop()
            for method, path, kw in (("GET", "/v1/jobs", {}), ("GET", "/v1/datasets", {}),
                                     ("GET", "/v1/jobs/job_0000000000000000000000", {}),
                                     ("POST", "/v1/datasets", {"files": multipart(tiny_dataset())})):
                t0 = time.monotonic()
                r = c.request(method, path, headers=h, **kw)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.json()["error"]["code"] in ("store_unavailable", "broker_unavailable")
                assert time.monotonic() - t0 < 10
            assert c.get("/readyz").status_code == 503
            assert c.get("/healthz").status_code == 200
            assert "dealrec_store_up 0" in c.get("/metrics").text
            server.start()
            r = c.get("/v1/jobs", headers=h)
            assert r.status_code == 200, r.text
    finally:
        server.stop()
