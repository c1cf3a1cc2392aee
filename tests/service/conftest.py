"""Fixtures for the service tests: the real Redis (a dedicated DB and a per-session key prefix, so
only our own keys are touched), a real Celery worker process, and the API as a real uvicorn server
process (`dealrec serve`) that the tests reach over HTTP with httpx.

Redis: `DEALREC_TEST_REDIS_URL` (default redis://127.0.0.1:6379/13); the tests skip when it does
not answer. A failing test's report ends with the log tail of every server and worker still running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("celery")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
redis = pytest.importorskip("redis")

from svc_helpers import KEYS, LIVE, METRICS_ADMIN_TOKEN, METRICS_TOKEN, ApiServer, auth, read_tail  # noqa: E402

from worker.service.jobstore import JobStore, connect  # noqa: E402
from worker.service.quotas import TenantQuotas  # noqa: E402
from worker.service.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("DEALREC_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture(scope="session")
def service_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    try:
        connect(REDIS_URL).ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    from tiny_llm import tiny_model_folder  # imported here: transformers is slow to import

    data = tmp_path_factory.mktemp("service-data")
    prefix = f"dealrec-test-{uuid.uuid4().hex[:10]}:"
    tiny_llm = tiny_model_folder(tmp_path_factory.mktemp("tiny-llm"))
    env = {
        "DEALREC_REDIS_URL": REDIS_URL,
        "DEALREC_KEY_PREFIX": prefix,
        "DEALREC_DATA_DIR": str(data),
        # The real-LLM test may share a warm cache (the de-quantised model) across runs.
        "DEALREC_CACHE_DIR": os.environ.get("DEALREC_TEST_CACHE", str(data / "cache")),
        "DEALREC_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
        "DEALREC_METRICS_TOKEN": METRICS_TOKEN,
        "DEALREC_METRICS_ADMIN_TOKEN": METRICS_ADMIN_TOKEN,
        "DEALREC_DEVICE": "cpu",
        # A tiny random Llama requests may name as `tiny`: the LLM stages (effort, fine-tuning,
        # evaluation) in seconds, for test_service_finetune.py.
        "DEALREC_LLMS": f"tiny={tiny_llm}",
        "DEALREC_TORCH_THREADS": "1",
        # Redelivery within seconds, so the kill-the-worker test does not wait 6 hours.
        "DEALREC_VISIBILITY_TIMEOUT_S": "5",
        "DEALREC_UNACKED_RESTORE_INTERVAL_S": "1",
        "DEALREC_UNACKED_RESTORE_THROTTLE": "1",
        "DEALREC_LOCK_TTL_S": "4",
        "DEALREC_WORKER_HEARTBEAT_S": "1",
        "DEALREC_PROGRESS_INTERVAL_S": "0.2",
        # The Games data fits, for the real-LLM test: 4.6 MB as the DEALRec layout, 12 MB as a CSV log.
        "DEALREC_MAX_UPLOAD_BYTES": str(16 << 20),
        "DEALREC_MAX_UNPACKED_BYTES": str(32 << 20),
        "DEALREC_MAX_ARCHIVE_FILES": "20",
        # Above deflate's most (about 1,030x): the archive bombs of the tests reach the guards behind
        # the ratio (unpacked size, the worker's validation); test_service_limits.py tests the ratio.
        "DEALREC_MAX_ARCHIVE_RATIO": "5000",
        "DEALREC_PING_TIMEOUT_S": "0.5",
    }
    yield env
    JobStore(connect(REDIS_URL), prefix).delete_all()


@pytest.fixture(scope="session")
def settings(service_env) -> Settings:
    return Settings.from_env(service_env)


@pytest.fixture(scope="session")
def store(settings) -> JobStore:
    return JobStore.from_settings(settings)


class WorkerProcess:
    """`celery -A worker.celery_app worker --pool solo -Q cpu,gpu` as a child process (`launcher`: the
    command before `-A`, default `python -m celery`; `queues`: the queues it takes tasks from)."""

    name = "worker"

    def __init__(self, env: dict[str, str], log_dir: Path, store: JobStore, launcher: list[str] | None = None,
                 queues: str = "cpu,gpu") -> None:
        self.launcher = launcher or [sys.executable, "-m", "celery"]
        self.queues = queues
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        self.log_dir = log_dir
        self.store = store
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None
        self.n = 0

    def start(self, timeout: float = 90.0) -> None:
        self.n += 1
        self.log = self.log_dir / f"worker-{self.n}.log"
        with open(self.log, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [*self.launcher, "-A", "worker.celery_app", "worker", "--pool", "solo", "-Q",
                 self.queues, "--loglevel", "INFO", "--hostname", f"test{self.n}-{uuid.uuid4().hex[:6]}@%h",
                 "--without-gossip", "--without-mingle", "--without-heartbeat"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            if any(w.endswith(f":{self.proc.pid}") for w in self.store.live_workers()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return read_tail(self.log, n)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The worker process stopped (SIGSTOP) while a test queues jobs: none of them can end meanwhile
        and free a slot, so what is held and what is refused does not depend on timing."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        # kill() returns before the process has stopped: wait until it has (state T), so that nothing it
        # was about to write (a heartbeat) lands after this point.
        deadline = time.monotonic() + 10
        while _proc_state(self.proc.pid) not in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.005)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)

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


def _proc_state(pid: int) -> str:
    """The process's state letter from /proc (R, S, T, ...); "" where /proc has none."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.fixture(scope="session")
def worker(service_env, store, tmp_path_factory) -> Iterator[WorkerProcess]:
    w = WorkerProcess(service_env, tmp_path_factory.mktemp("worker-logs"), store)
    LIVE[id(w)] = w
    w.start()
    yield w
    w.stop()
    LIVE.pop(id(w), None)


class OwnService:
    """An API server and a Celery worker of a test module's own (`own_service`): `svc(method, url,
    tenant=..., **kw)` calls the API with that tenant's key; `quotas()` reads the tenants' quotas."""

    def __init__(self, server: ApiServer, worker: WorkerProcess, store: JobStore, env: dict[str, str],
                 keys: dict[str, str]) -> None:
        self.server, self.worker, self.store, self.env, self.keys = server, worker, store, env, keys
        self.client = server.client()

    def __call__(self, method: str, url: str, tenant: str | None = None, **kw):
        key = self.keys[tenant or next(iter(self.keys))]
        headers = {"Authorization": f"Bearer {key}", **kw.pop("headers", {})}
        return self.client.request(method, url, headers=headers, **kw)

    def quotas(self) -> TenantQuotas:
        return TenantQuotas.from_settings(self.store, Settings.from_env(self.env))


@contextmanager
def own_service(service_env: dict[str, str], tmp_path_factory, name: str, keys: dict[str, str], *,
                queues: str = "cpu,gpu", **overrides: str) -> Iterator[OwnService]:
    """An API server and a worker (on `queues`) with the session's settings and `overrides` (DEALREC_*
    variables), a key prefix and data folder of their own and the tenants of `keys`, so that what the
    module's tests do (low limits, a short stale age) never meets the session's other tests; every
    key of the prefix is removed afterwards."""
    prefix = f"{service_env['DEALREC_KEY_PREFIX']}{name}-{uuid.uuid4().hex[:6]}:"
    env = {**service_env, **overrides, "DEALREC_KEY_PREFIX": prefix,
           "DEALREC_DATA_DIR": str(tmp_path_factory.mktemp(f"{name}-data")),
           "DEALREC_API_KEYS": ",".join(f"{t}:{k}" for t, k in keys.items())}
    store = JobStore(connect(env["DEALREC_REDIS_URL"]), prefix)
    logs = tmp_path_factory.mktemp(f"{name}-logs")
    server = ApiServer(env, logs, name=f"api-{name}").start()
    worker = WorkerProcess(env, logs, store, queues=queues)
    worker.n = 30  # its own log file
    LIVE[id(worker)] = worker
    try:
        worker.start()
        service = OwnService(server, worker, store, env, keys)
        yield service
        service.client.close()
    finally:
        worker.stop()
        LIVE.pop(id(worker), None)
        server.stop()
        store.delete_all()


@pytest.fixture(scope="session")
def api_server(service_env, tmp_path_factory) -> Iterator[ApiServer]:
    """The session's API: `dealrec serve` on a free port, the worker's DEALREC_* settings."""
    server = ApiServer(service_env, tmp_path_factory.mktemp("api-logs")).start()
    yield server
    server.stop()


@pytest.fixture
def start_api_server(service_env, tmp_path) -> Iterator[Callable[..., ApiServer]]:
    """start_api_server(DEALREC_X=...) -> a server of the test's own, the session's settings overridden;
    stopped after the test (after its report, which therefore still shows the log tail)."""
    servers: list[ApiServer] = []

    def start(**overrides: str) -> ApiServer:
        log_dir = tmp_path / f"api-logs-{len(servers)}"
        log_dir.mkdir()
        servers.append(ApiServer({**service_env, **overrides}, log_dir, name=f"api-{len(servers)}"))
        return servers[-1].start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def client(api_server, worker) -> Iterator[httpx.Client]:
    """A plain HTTP client of the session's server (a worker is running: the tests expect one)."""
    with api_server.client() as c:
        yield c


@pytest.fixture(scope="session")
def api(client) -> Callable:
    """api(method, url, tenant="acme", **kw) -> response, with that tenant's key."""
    def call(method: str, url: str, tenant: str = "acme", **kw):
        headers = {**auth(tenant), **kw.pop("headers", {})}
        return client.request(method, url, headers=headers, **kw)
    return call


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, the log tails of the live server(s) and worker: the cause of a 500 or a stuck job
    is in another process's log, not in the test's output."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for proc in list(LIVE.values()):
            report.sections.append((f"{proc.name} log (tail)", proc.tail() or "(empty)"))


@pytest.fixture(scope="module")
def http(api_server) -> Iterator[httpx.Client]:
    """A client of the session's API server, for the schema tests."""
    with api_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def spec(http) -> dict:
    """The live server's /openapi.json."""
    r = http.get("/openapi.json")
    assert r.status_code == 200, r.text
    return r.json()
