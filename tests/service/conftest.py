"""Fixtures for the service tests: the real Redis (a dedicated DB and a per-session key prefix, so
only our own keys are touched), a real Celery worker process, and the API in-process.

Redis: `DEALREC_TEST_REDIS_URL` (default redis://127.0.0.1:6379/13); the tests skip when it does
not answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("celery")
redis = pytest.importorskip("redis")

from fastapi.testclient import TestClient  # noqa: E402

from app.main import create_app  # noqa: E402
from svc_helpers import KEYS, auth  # noqa: E402
from worker.config import Settings  # noqa: E402
from worker.store import Store, connect  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("DEALREC_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture(scope="session")
def service_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    try:
        connect(REDIS_URL).ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    data = tmp_path_factory.mktemp("service-data")
    prefix = f"dealrec-test-{uuid.uuid4().hex[:10]}:"
    env = {
        "DEALREC_REDIS_URL": REDIS_URL,
        "DEALREC_KEY_PREFIX": prefix,
        "DEALREC_DATA_DIR": str(data),
        # The real-LLM test may share a warm cache (the de-quantised model) across runs.
        "DEALREC_CACHE_DIR": os.environ.get("DEALREC_TEST_CACHE", str(data / "cache")),
        "DEALREC_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
        "DEALREC_DEVICE": "cpu",
        "DEALREC_TORCH_THREADS": "1",
        # Redelivery within seconds, so the kill-the-worker test does not wait 6 hours.
        "DEALREC_VISIBILITY_TIMEOUT_S": "5",
        "DEALREC_UNACKED_RESTORE_INTERVAL_S": "1",
        "DEALREC_UNACKED_RESTORE_THROTTLE": "1",
        "DEALREC_LOCK_TTL_S": "4",
        "DEALREC_WORKER_HEARTBEAT_S": "1",
        "DEALREC_PROGRESS_INTERVAL_S": "0.2",
        "DEALREC_MAX_UPLOAD_BYTES": str(8 << 20),  # the Games files fit, for the real-LLM test
        "DEALREC_MAX_UNPACKED_BYTES": str(16 << 20),
        "DEALREC_MAX_ARCHIVE_FILES": "20",
        "DEALREC_PING_TIMEOUT_S": "0.5",
    }
    yield env
    Store(connect(REDIS_URL), prefix).delete_all()


@pytest.fixture(scope="session")
def settings(service_env) -> Settings:
    return Settings.from_env(service_env)


@pytest.fixture(scope="session")
def store(settings) -> Store:
    return Store.from_settings(settings)


class WorkerProcess:
    """`celery -A worker.celery_app worker --pool solo -Q cpu,gpu` as a child process."""

    def __init__(self, env: dict[str, str], log_dir: Path, store: Store) -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        self.log_dir = log_dir
        self.store = store
        self.proc: subprocess.Popen | None = None
        self.n = 0

    def start(self, timeout: float = 90.0) -> None:
        self.n += 1
        self.log = self.log_dir / f"worker-{self.n}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo", "-Q", "cpu,gpu",
             "--loglevel", "INFO", "--hostname", f"test{self.n}-{uuid.uuid4().hex[:6]}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env=self.env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            if any(w.endswith(f":{self.proc.pid}") for w in self.store.live_workers()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no cleanup, no ack; the job's message stays unacked in Redis."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def worker(service_env, store, tmp_path_factory) -> Iterator[WorkerProcess]:
    w = WorkerProcess(service_env, tmp_path_factory.mktemp("worker-logs"), store)
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="session")
def client(settings, worker) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="session")
def api(client) -> Callable:
    """api(method, url, tenant="acme", **kw) -> response, with that tenant's key."""
    def call(method: str, url: str, tenant: str = "acme", **kw):
        headers = {**auth(tenant), **kw.pop("headers", {})}
        return client.request(method, url, headers=headers, **kw)
    return call
