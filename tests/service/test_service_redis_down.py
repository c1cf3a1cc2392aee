"""With Redis stopped the API answers 503 JSON, and recovers by itself when Redis is back.

Runs its own redis-server on a free port (the shared one is never stopped) and its own API server
process pointed at it (the session's server talks to the shared Redis)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
from svc_helpers import METRICS_TOKEN, auth, free_port, multipart, tiny_dataset

from worker.service.jobstore import connect


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
def test_redis_down_is_503_and_recovers(start_api_server, tmp_path):
    port = free_port()
    server = PrivateRedis(port, tmp_path)
    server.start()
    url = f"redis://127.0.0.1:{port}/0"
    try:
        api_server = start_api_server(DEALREC_REDIS_URL=url, DEALREC_DATA_DIR=str(tmp_path / "data"))
        with api_server.client() as c:
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
            assert "dealrec_store_up 0" in c.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
            server.start()
            r = c.get("/v1/jobs", headers=h)
            assert r.status_code == 200, r.text
    finally:
        server.stop()
