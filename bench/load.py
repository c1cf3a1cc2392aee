"""Load test of job-status polling: `GET /v1/jobs/{id}` at a fixed rate against a job that is running.

    python bench/load.py [--rate 200] [--duration 60] [--concurrency 32] [--json]
    python bench/load.py --url http://127.0.0.1:8000 --key KEY [--job-id JOB] ...

Without --url it starts everything itself, on loopback only: the API (`dealrec serve --host 127.0.0.1`
on a free port) and one real Celery worker (`dealrec worker --queues cpu,gpu --pool solo`), both on the
real Redis at --redis-url (default DB 14) under a fresh key prefix, with a temporary data folder and
a random API key. It uploads a tiny DEALRec-layout dataset, starts an `influence` job whose surrogate
has a million epochs (so it is still training, one CPU core busy, when the polling starts), polls it,
then cancels the job, stops both processes, deletes every Redis key under its prefix and the
temporary folder.

With --url it targets an API that is already running there (a worker must be too) with the tenant key
--key: it polls --job-id, or creates its own dataset and job as above, cancels that job and deletes
that dataset at the end. Only loopback addresses (127.0.0.1, ::1, localhost) are accepted.

The requests go out through a lean keep-alive HTTP/1.1 client on asyncio streams (`--client httpx`
uses httpx.AsyncClient instead, which costs the shared cores about ten times more CPU per request).
The schedule is open-loop: request i is due at start + i / rate, whatever the previous answers; at
most --concurrency are in flight (a due request waits for a free slot, and that wait is reported as
`max_start_lag_ms`). Latency is from sending a request to having read its whole answer. An error is
an exception (timeout, connection) or any status other than 200. The run is bounded: exactly
rate * duration requests, and it gives up --request-timeout seconds after the last one is due.

Printed: requests, errors (by kind), latency p50/p90/p99/max in ms, the rate achieved, the job's
status before and after. With --json the last line is one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import MAX_EPOCHS  # noqa: E402
from core.data.synthetic import dealrec_layout_files  # noqa: E402

LOOPBACK_NAMES = {"localhost"}

# A job that keeps running: no validation before the last of the most surrogate epochs a request may
# ask for (core.config.MAX_EPOCHS, 10,000), each of 200 one-sample steps (0.5 to 1 s here): an
# hour or more of training, longer than any --duration.
RUNNING_JOB_PARAMS = {"surrogate": {"epochs": MAX_EPOCHS, "eval_every": MAX_EPOCHS, "patience": 1000,
                                    "batch_size": 1},
                      "influence": {"lissa_steps": 200}}


def log(msg: str) -> None:
    sys.stderr.write(f"[load] {msg}\n")
    sys.stderr.flush()


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_dataset(n_users: int = 200, n_items: int = 60, seed: int = 0) -> dict[str, bytes]:
    return dealrec_layout_files(n_users, n_items, seed)


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(interval)
    raise RuntimeError(f"{what}: not done after {timeout:.0f} s (last: {last!r})")


# ---- the processes (self-contained mode) -----------------------------------------------------------

class Service:
    """The API and one worker as child processes, on loopback, under their own Redis key prefix."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="dealrec-load-"))
        self.prefix = f"dealrec-load-{uuid.uuid4().hex[:10]}:"
        self.key = secrets.token_urlsafe(24)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "DEALREC_REDIS_URL": args.redis_url,
            "DEALREC_KEY_PREFIX": self.prefix,
            "DEALREC_DATA_DIR": str(self.tmp / "data"),
            "DEALREC_API_KEYS": f"load:{self.key}",
            "DEALREC_DEVICE": "cpu",
            "DEALREC_TORCH_THREADS": str(args.worker_threads),
        }

    def dealrec(self, *argv: str, name: str) -> subprocess.Popen:
        logf = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - the child process writes it until stop()
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", *argv], cwd=ROOT, env=self.env,
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        self.procs.append((name, proc))
        return proc

    def start(self) -> None:
        from worker.service.jobstore import connect

        connect(self.args.redis_url).ping()  # a clear error before anything starts
        log(f"redis {self.args.redis_url}, key prefix {self.prefix}, data {self.tmp / 'data'}")
        self.dealrec("worker", "--queues", "cpu,gpu", "--pool", "solo", "--log-level", "warning",
                     "--hostname", f"load-{uuid.uuid4().hex[:6]}@%h", name="worker")
        self.dealrec("serve", "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.args.api_workers),
                     "--log-level", self.args.api_log_level, name="api")

        def ready():
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
            r = httpx.get(f"{self.url}/readyz", timeout=2.0)
            return r.status_code == 200
        wait_until(ready, 120, "API and worker ready", interval=0.5)
        log(f"API {self.url} and worker ready")

    def tail(self, name: str, n: int = 3000) -> str:
        try:
            return (self.tmp / f"{name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # uvicorn: graceful; celery: warm shutdown
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop within 30 s: SIGKILL")
                proc.kill()
                proc.wait(timeout=10)
        try:
            from worker.service.jobstore import JobStore, connect

            n = JobStore(connect(self.args.redis_url), self.prefix).delete_all()
            log(f"deleted {n} Redis keys under {self.prefix}")
        except Exception as exc:  # noqa: BLE001 - cleanup reports, never masks the result
            log(f"Redis cleanup failed: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---- the job to poll -------------------------------------------------------------------------------

class JobSetup:
    def __init__(self, url: str, key: str) -> None:
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30.0)
        self.dataset_id: str | None = None
        self.job_id: str | None = None

    def create(self) -> str:
        files = [("files", (name, data, "application/octet-stream")) for name, data in tiny_dataset().items()]
        r = self.client.post("/v1/datasets", files=files, params={"name": "load-test"})
        r.raise_for_status()
        self.dataset_id = r.json()["id"]
        ds = wait_until(lambda: (lambda d: d if d["status"] != "validating" else None)(
            self.client.get(f"/v1/datasets/{self.dataset_id}").json()), 120, "dataset validation")
        if ds["status"] != "ready":
            raise RuntimeError(f"dataset {self.dataset_id} is {ds['status']}: {ds.get('errors')}")
        r = self.client.post("/v1/prune", json={"dataset_id": self.dataset_id, "budget": 16, "method": "influence",
                                                "seed": 0, "params": RUNNING_JOB_PARAMS})
        r.raise_for_status()
        self.job_id = r.json()["id"]
        wait_until(lambda: self.status(self.job_id) == "running" or None, 120, f"job {self.job_id} running")
        log(f"dataset {self.dataset_id} ready; job {self.job_id} running")
        return self.job_id

    def status(self, job_id: str) -> str:
        r = self.client.get(f"/v1/jobs/{job_id}")
        r.raise_for_status()
        return r.json()["status"]

    def cleanup(self) -> None:
        """Cancel our job and delete our dataset (only what create() made)."""
        try:
            if self.job_id:
                self.client.post(f"/v1/jobs/{self.job_id}/cancel")
                final = wait_until(lambda: (lambda s: s if s in ("cancelled", "succeeded", "failed") else None)(
                    self.status(self.job_id)), 60, f"job {self.job_id} stopped")
                log(f"job {self.job_id}: {final}")
            if self.dataset_id:
                r = self.client.delete(f"/v1/datasets/{self.dataset_id}")
                log(f"dataset {self.dataset_id} deleted ({r.status_code})")
        except Exception as exc:  # noqa: BLE001
            log(f"cleanup through the API failed: {exc}")
        finally:
            self.client.close()


# ---- the load --------------------------------------------------------------------------------------

def percentile(sorted_ms: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_ms:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_ms)))
    return sorted_ms[rank - 1]


class RawClient:
    """A lean HTTP/1.1 keep-alive client on asyncio streams, for GET only: the load generator shares
    this machine's cores with the API, the worker and Redis, and httpx spends about ten times more
    CPU per request. One connection per request in flight (no pipelining), at most `size` of them."""

    # uvicorn closes a keep-alive connection idle for 5 s; reuse none idle longer than this.
    MAX_IDLE_S = 4.0

    def __init__(self, url: str, key: str, size: int, timeout: float) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.after_path = (f" HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                           f"Authorization: Bearer {key}\r\nAccept: application/json\r\n\r\n").encode()
        self.timeout = timeout
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.size = size
        self.stale_retries = 0  # reused connections the server had closed (retried once on a new one)

    def _reusable(self):
        while self.idle:
            reader, writer, since = self.idle.pop()
            if not reader.at_eof() and time.monotonic() - since < self.MAX_IDLE_S:
                return reader, writer
            writer.close()
        return None

    async def get(self, path: str) -> tuple[int, bytes]:
        conn = self._reusable()
        if conn is not None:
            try:
                return await self._exchange(conn, path)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise
                self.stale_retries += 1  # closed by the server before it read the request: as httpx, retry
        conn = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)
        return await self._exchange(conn, path)

    async def _exchange(self, conn, path: str) -> tuple[int, bytes]:
        reader, writer = conn
        try:
            writer.write(b"GET " + path.encode() + self.after_path)
            status, body, keep = await asyncio.wait_for(self._response(reader), self.timeout)
        except BaseException:
            writer.close()
            raise
        if keep and len(self.idle) < self.size:
            self.idle.append((reader, writer, time.monotonic()))
        else:
            writer.close()
        return status, body

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunks.append(await reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(c[:-2] for c in chunks)
        else:
            raise ConnectionError("response without Content-Length or chunked body")
        return status, body, headers.get("connection", "").lower() != "close"

    async def aclose(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


async def poll(url: str, key: str, job_id: str, rate: float, duration: float, concurrency: int,
               timeout: float, client_kind: str = "raw") -> dict:
    n = int(round(rate * duration))
    latencies: list[float] = []
    sent_at: list[float] = []  # send time of each latency, for the per-window figures
    errors: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    max_lag = 0.0
    first_sent: float | None = None
    last_done = 0.0
    sem = asyncio.Semaphore(concurrency)
    path = f"/v1/jobs/{job_id}"

    if client_kind == "httpx":
        hx = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout,
                               limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))

        async def fetch() -> tuple[int, bytes]:
            r = await hx.get(path)
            return r.status_code, await r.aread()

        async def close() -> None:
            await hx.aclose()
    else:
        raw = RawClient(url, key, concurrency, timeout)

        async def fetch() -> tuple[int, bytes]:
            return await raw.get(path)

        close = raw.aclose

    async def one() -> None:
        nonlocal first_sent, last_done
        t0 = time.perf_counter()
        if first_sent is None:
            first_sent = t0
        try:
            code, body = await fetch()
            dt = (time.perf_counter() - t0) * 1000.0
            if code == 200:
                latencies.append(dt)
                sent_at.append(t0)
                statuses[json.loads(body).get("status", "?")] += 1
            else:
                errors[f"http_{code}"] += 1
        except (httpx.HTTPError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            errors[type(exc).__name__] += 1
        finally:
            last_done = time.perf_counter()
            sem.release()

    try:
        # Open a few connections before the clock starts.
        for _ in range(min(concurrency, 8)):
            await sem.acquire()
            await one()
        latencies.clear()
        sent_at.clear()
        statuses.clear()
        errors.clear()
        first_sent = None

        tasks = []
        start = time.perf_counter() + 0.05
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await sem.acquire()
            max_lag = max(max_lag, time.perf_counter() - due)
            tasks.append(asyncio.create_task(one()))
        _, pending = await asyncio.wait(tasks, timeout=timeout + 1.0)
        for t in pending:
            t.cancel()
            errors["unfinished"] += 1
    finally:
        await close()

    windows = []
    if sent_at:
        width = 10.0 if duration >= 20 else max(1.0, duration / 2)
        by: dict[int, list[float]] = {}
        for t, dt in zip(sent_at, latencies):
            by.setdefault(int((t - first_sent) // width), []).append(dt)
        for w in sorted(by):
            v = sorted(by[w])
            windows.append({"from_s": w * width, "n": len(v), "p50": _r(percentile(v, 50)),
                            "p99": _r(percentile(v, 99)), "max": _r(v[-1])})
    lat = sorted(latencies)
    span = (last_done - first_sent) if first_sent is not None else 0.0
    completed = len(lat) + sum(v for k, v in errors.items() if k != "unfinished")
    return {
        "requests": n,
        "ok": len(lat),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "job_status_seen": dict(statuses),
        "target_rate": rate,
        "achieved_rate": round(completed / span, 1) if span > 0 else None,
        "duration_s": round(span, 2),
        "concurrency": concurrency,
        "client": client_kind,
        "stale_connection_retries": raw.stale_retries if client_kind == "raw" else None,
        "latency_ms": {
            "p50": _r(percentile(lat, 50)), "p90": _r(percentile(lat, 90)), "p99": _r(percentile(lat, 99)),
            "max": _r(lat[-1] if lat else None), "mean": _r(sum(lat) / len(lat) if lat else None),
        },
        "max_start_lag_ms": round(max_lag * 1000.0, 2),
        "windows": windows,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="an API already running on loopback (default: start one)")
    p.add_argument("--key", default=None, help="with --url: a tenant's API key")
    p.add_argument("--job-id", default=None, help="with --url: poll this job (default: create a running one)")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second (200)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of polling (60)")
    p.add_argument("--concurrency", type=int, default=32, help="most requests in flight (32)")
    p.add_argument("--client", default="raw", choices=["raw", "httpx"],
                   help="load client: a lean keep-alive HTTP/1.1 client on asyncio (default) or httpx.AsyncClient")
    p.add_argument("--request-timeout", type=float, default=5.0, help="seconds before a request is an error (5)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14",
                   help="without --url: the Redis the started service uses (a fresh key prefix in it)")
    p.add_argument("--api-workers", type=int, default=1, help="without --url: API processes (1)")
    p.add_argument("--api-log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="without --url: the API's log level; 'info' adds one access-log line per request")
    p.add_argument("--worker-threads", type=int, default=1, help="without --url: the worker's torch threads (1)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)

    if not (0 < args.rate <= 5000 and 0 < args.duration <= 3600 and 1 <= args.concurrency <= 1000):
        p.error("need 0 < --rate <= 5000, 0 < --duration <= 3600, 1 <= --concurrency <= 1000")
    if args.url is not None:
        if not is_loopback(urlsplit(args.url).hostname):
            p.error(f"--url must be a loopback address (127.0.0.1, ::1, localhost), not {args.url}")
        if not args.key:
            p.error("--url needs --key")
    elif not is_loopback(urlsplit(args.redis_url).hostname):
        p.error(f"--redis-url must be a loopback address, not {args.redis_url}")

    service = Service(args) if args.url is None else None
    url = args.url.rstrip("/") if args.url else service.url
    key = args.key or service.key
    setup: JobSetup | None = None
    try:
        if service is not None:
            service.start()
        if args.job_id:
            job_id = args.job_id
            probe = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10)
            probe.raise_for_status()
        else:
            setup = JobSetup(url, key)
            job_id = setup.create()
        before = _status(url, key, job_id)
        log(f"polling GET /v1/jobs/{job_id} at {args.rate:g}/s for {args.duration:g} s "
            f"(concurrency {args.concurrency})")
        result = asyncio.run(poll(url, key, job_id, args.rate, args.duration, args.concurrency,
                                  args.request_timeout, args.client))
        result["job_status_before"] = before
        result["job_status_after"] = _status(url, key, job_id)
        result["job_id"] = job_id
        result["started_service"] = service is not None
    finally:
        if setup is not None:
            setup.cleanup()
        if service is not None:
            service.stop()

    lat = result["latency_ms"]
    print(f"requests {result['requests']}  ok {result['ok']}  errors {result['errors']} {result['error_kinds'] or ''}")
    print(f"latency ms  p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}  mean {lat['mean']}")
    print(f"rate {result['achieved_rate']}/s achieved of {args.rate:g}/s over {result['duration_s']} s; "
          f"max start lag {result['max_start_lag_ms']} ms; job {result['job_status_before']} -> "
          f"{result['job_status_after']} (answers saw {result['job_status_seen']})")
    for w in result["windows"]:
        print(f"  from {w['from_s']:>5.0f} s: n {w['n']:>5}  p50 {w['p50']}  p99 {w['p99']}  max {w['max']}")
    if args.json:
        print(json.dumps(result))
    return 0 if result["errors"] == 0 else 1


def _status(url: str, key: str, job_id: str) -> str:
    r = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    r.raise_for_status()
    return r.json()["status"]


if __name__ == "__main__":
    sys.exit(main())
