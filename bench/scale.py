"""Scale-out and incremental benchmark of the service's effort stage, on real worker processes.

    python bench/scale.py --data ../shared/datasets/games --limit-users 2000 [--kill-users 600] [--json]

Each part starts its own service on loopback (the API and `dealrec worker --procs K`, one torch
thread per process, on the real Redis at --redis-url under a fresh key prefix, a fresh data folder:
an empty effort store), uploads the first users of --data as a dataset and runs `dealrec` jobs with
the default LLM:

(a) speed-up: the same job (N users) with 1 worker process, then with 2; the effort stage's wall time
    (from the job's "effort: ... to score in ... shards" event to its "job continues after its effort
    shards" event) and the speed-up; the two selections must be identical.
(b) incremental: on the 2-worker service, the dataset is extended by --extra (10 %) more users
    (POST /v1/datasets/{id}/versions) and pruned again: the surrogate warm-starts from the previous
    version's and only the new samples' effort is computed. Against it, a cold prune of the same
    extended data on a fresh 2-worker service (empty store, no previous version). Both are whole-job
    wall times (created -> succeeded); `rescored` is the incremental job's count of samples scored.
(c) kill test: a fresh 2-worker service with fast redelivery prunes the first --kill-users users;
    one worker process is SIGKILLed in the middle of the effort stage (its supervisor starts a new
    one); the job must succeed with the selection the 2-worker service of (a) gives for the same
    users (computed there from its store), and the shards together must have scored the pool at most
    one shard over.

Printed: each part's figures and the peak RSS of the workers; with --json the last line is one JSON
object with `effort_speedup_2_workers`, `incremental_over_cold`, `rescored`, `selection_equal` and the
details. Needs an otherwise idle machine: the speed-up is a ratio of two wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import Service, log, wait_until  # noqa: E402
from core.data.synthetic import split_users  # noqa: E402

PER_USER_FILES = ("sequential_train.txt", "sequential_valid.txt", "sequential_test.txt", "users.tsv")


def first_users(folder: Path, n: int) -> dict[str, bytes]:
    """The DEALRec-layout files of `folder` cut to their first `n` users (the item table whole)."""
    files = {name: (folder / name).read_bytes() for name in (*PER_USER_FILES, "items.tsv")}
    if files["sequential_train.txt"].count(b"\n") < n:
        raise SystemExit(f"scale: error: {folder} has fewer than {n} users")
    return split_users(files, n)[0]


class ScaleService(Service):
    """The API and `dealrec worker --procs K` (both queues) under a fresh prefix and data folder."""

    def __init__(self, args: argparse.Namespace, procs: int, name: str, **env: str) -> None:
        super().__init__(SimpleNamespace(redis_url=args.redis_url, worker_threads=1, api_workers=1,
                                         api_log_level="warning"))
        self.procs_wanted, self.name = procs, name
        self.env.update({"DEALREC_EFFORT_SHARD_TOKENS": str(args.shard_tokens), "DEALREC_PROGRESS_INTERVAL_S": "1",
                         **env})
        self.client: httpx.Client | None = None

    def start(self) -> None:
        from worker.service.jobstore import connect

        connect(self.args.redis_url).ping()
        self.pool = self.dealrec("worker", "--procs", str(self.procs_wanted), "--queues", "cpu,gpu",
                                 "--log-level", "info", "--hostname", f"{self.name}@%h", name="worker")
        self.dealrec("serve", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", name="api")
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60.0)

        def ready():
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
            r = httpx.get(f"{self.url}/readyz", timeout=2.0)
            return r.status_code == 200 and r.json()["checks"]["workers"] >= self.procs_wanted  # a count
        wait_until(ready, 180, f"{self.name}: API and {self.procs_wanted} worker processes ready", interval=0.5)
        log(f"{self.name}: API {self.url}, {self.procs_wanted} worker process(es)")

    def children(self) -> list[int]:
        """The worker processes the supervisor started (their pids)."""
        path = Path(f"/proc/{self.pool.pid}/task/{self.pool.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def peak_rss_mb(self) -> float:
        """The largest peak RSS of the current worker processes (VmHWM), MiB."""
        peak = 0.0
        for pid in self.children():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
            except OSError:
                pass
        return round(peak, 1)

    # ---- the API ------------------------------------------------------------------------------
    def upload(self, files: dict[str, bytes], parent: str | None = None) -> str:
        multipart = [("files", (name, data, "application/octet-stream")) for name, data in files.items()]
        url = f"/v1/datasets/{parent}/versions" if parent else "/v1/datasets"
        r = self.client.post(url, files=multipart)
        r.raise_for_status()
        ds_id = r.json()["id"]
        ds = wait_until(lambda: (lambda d: d if d["status"] != "validating" else None)(
            self.client.get(f"/v1/datasets/{ds_id}").json()), 300, f"dataset {ds_id} validated")
        if ds["status"] != "ready":
            raise RuntimeError(f"dataset {ds_id} is {ds['status']}: {ds.get('errors')}")
        return ds_id

    def prune(self, dataset_id: str, args: argparse.Namespace, on_running=None, **extra: Any) -> dict[str, Any]:
        body = {"dataset_id": dataset_id, "method": "dealrec", "budget": args.budget, "seed": args.seed, **extra}
        r = self.client.post("/v1/prune", json=body)
        r.raise_for_status()
        job_id = r.json()["id"]
        t0 = time.perf_counter()
        fired = False
        while True:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            if on_running is not None and not fired and job["stage"] == "effort" and job["progress"] > 0:
                fired = on_running(job)
            time.sleep(0.5)
        wall = time.perf_counter() - t0
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}\n{self.tail('worker')}")
        events = self.client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["items"]
        selected = [s["user_id"] for s in self.client.get(f"/v1/jobs/{job_id}/selection").json()["selected"]]
        return {"job": job_id, "wall_s": round(wall, 1), "effort_s": effort_seconds(events),
                "effort": job["result"]["effort"], "surrogate": job["result"].get("surrogate"),
                "selected": selected, "events": events}

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        super().stop()


def effort_seconds(events: list[dict]) -> float | None:
    """Wall time of a job's sharded effort stage, from its events (None when nothing was scored)."""
    def at(pred) -> datetime | None:
        hits = [datetime.fromisoformat(e["created_at"]) for e in events if pred(e["message"])]
        return hits[0] if hits else None
    start = at(lambda m: m.startswith("effort: ") and "to score in" in m)
    end = at(lambda m: m == "job continues after its effort shards")
    return round((end - start).total_seconds(), 1) if start and end else None


def shard_stats(events: list[dict]) -> dict[str, int]:
    shards = [e["data"] for e in events if e["message"].startswith("effort shard")]
    return {"shard_events": len(shards), "scored": sum(s.get("scored", 0) for s in shards),
            "biggest_shard": max((s.get("samples", 0) for s in shards), default=0)}


def run_service(args: argparse.Namespace, procs: int, name: str, work, **env: str) -> Any:
    svc = ScaleService(args, procs, name, **env)
    try:
        svc.start()
        out = work(svc)
        if isinstance(out, dict):
            out["worker_peak_rss_mb"] = svc.peak_rss_mb()
        return out
    finally:
        svc.stop()


def part_speedup(args, files) -> tuple[dict, dict]:
    log(f"(a) {args.limit_users} users, 1 worker process")
    one = run_service(args, 1, "scale1", lambda s: s.prune(s.upload(files), args))
    log(f"(a) 1 worker: effort {one['effort_s']} s, job {one['wall_s']} s")

    def two_workers(svc: ScaleService) -> dict:
        res = svc.prune(d1 := svc.upload(files), args)
        log(f"(a) 2 workers: effort {res['effort_s']} s, job {res['wall_s']} s")
        _, added = split_users(first_users(Path(args.data), args.limit_users + args.extra), args.limit_users)
        d2 = svc.upload(added, parent=d1)
        res["incremental"] = svc.prune(d2, args)
        log(f"(b) incremental: job {res['incremental']['wall_s']} s, {res['incremental']['effort']}")
        if args.kill_users:
            res["kill_reference"] = svc.prune(svc.upload(first_users(Path(args.data), args.kill_users)), args)
        return res
    two = run_service(args, 2, "scale2", two_workers)
    return one, two


def part_cold(args) -> dict:
    files = first_users(Path(args.data), args.limit_users + args.extra)
    cold = run_service(args, 2, "scale3", lambda s: s.prune(s.upload(files), args))
    log(f"(b) cold prune of the extended data: job {cold['wall_s']} s, effort {cold['effort_s']} s")
    return cold


def part_kill(args) -> dict:
    files = first_users(Path(args.data), args.kill_users)
    fast = {"DEALREC_VISIBILITY_TIMEOUT_S": "10", "DEALREC_UNACKED_RESTORE_INTERVAL_S": "1",
            "DEALREC_UNACKED_RESTORE_THROTTLE": "1", "DEALREC_LOCK_TTL_S": "6", "DEALREC_WORKER_HEARTBEAT_S": "1"}

    def work(svc: ScaleService) -> dict:
        killed: list[int] = []

        def kill_one(job: dict) -> bool:
            if job["progress"] < args.kill_at:
                return False
            kids = svc.children()
            if len(kids) < 2:
                return False
            os.kill(kids[0], signal.SIGKILL)
            killed.append(kids[0])
            log(f"(c) SIGKILL worker pid {kids[0]} at job progress {job['progress']:.2f}")
            return True
        res = svc.prune(svc.upload(files), args, on_running=kill_one)
        res["killed"] = killed
        return res
    return run_service(args, 2, "scale4", work, **fast)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a DEALRec-layout folder (one line per user)")
    p.add_argument("--limit-users", type=int, default=2000, help="users of the speed-up job (2000)")
    p.add_argument("--extra", type=int, default=None, help="users the new version adds (10 %% more)")
    p.add_argument("--kill-users", type=int, default=None, help="users of the kill test (--limit-users; 0: none)")
    p.add_argument("--kill-at", type=float, default=0.4, help="job progress at which a worker is killed (0.4)")
    p.add_argument("--budget", type=int, default=None, help="selection size (default 2 %% of the users)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-tokens", type=int, default=40_000,
                   help="prompt tokens per effort shard (40,000: about 250 Games prompts, 8 shards for 2,000 users)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    p.add_argument("--parts", default="speedup,cold,kill",
                   help="parts to run (speedup,cold,kill); kill alone takes its reference from a fresh service")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts or parts - {"speedup", "cold", "kill"} or ("cold" in parts and "speedup" not in parts):
        p.error("--parts takes speedup, cold, kill (cold needs speedup)")
    args.extra = args.extra if args.extra is not None else max(1, args.limit_users // 10)
    args.kill_users = args.limit_users if args.kill_users is None else args.kill_users
    args.budget = args.budget or max(1, args.limit_users // 50)
    if args.kill_users > args.limit_users:
        p.error("--kill-users must not exceed --limit-users (its reference comes from that dataset's store)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    files = first_users(Path(args.data), args.limit_users)
    t0 = time.perf_counter()

    report: dict[str, Any] = {"users": args.limit_users, "extra_users": args.extra, "budget": args.budget,
                              "seed": args.seed, "shard_tokens": args.shard_tokens}
    selection_equal = True
    reference = None
    if "speedup" in parts:
        one, two = part_speedup(args, files)
        cold = part_cold(args)
        inc = two["incremental"]
        report.update({
            "effort_seconds_1_worker": one["effort_s"], "effort_seconds_2_workers": two["effort_s"],
            "effort_speedup_2_workers": round(one["effort_s"] / two["effort_s"], 3),
            "job_seconds_1_worker": one["wall_s"], "job_seconds_2_workers": two["wall_s"],
            "incremental_seconds": inc["wall_s"], "cold_seconds": cold["wall_s"],
            "incremental_over_cold": round(inc["wall_s"] / cold["wall_s"], 3),
            "rescored": inc["effort"].get("scored"), "from_store": inc["effort"].get("from_store"),
            "incremental_surrogate": inc["surrogate"], "cold_surrogate": cold["surrogate"],
            "selection_equal_1_vs_2_workers": one["selected"] == two["selected"],
            "worker_peak_rss_mb": {"1_worker": one["worker_peak_rss_mb"], "2_workers": two["worker_peak_rss_mb"],
                                   "cold": cold["worker_peak_rss_mb"]}})
        selection_equal = report["selection_equal_1_vs_2_workers"]
        reference = two.get("kill_reference")
    if "kill" in parts and args.kill_users:
        if reference is None:
            kill_files = first_users(Path(args.data), args.kill_users)
            reference = run_service(args, 2, "scale-ref", lambda s: s.prune(s.upload(kill_files), args))
        kill = part_kill(args)
        stats = shard_stats(kill["events"])
        report["kill"] = {"users": args.kill_users, "killed_pids": kill["killed"], "job_seconds": kill["wall_s"],
                          "selection_equal": kill["selected"] == reference["selected"],
                          "recomputed_samples": stats["scored"] - args.kill_users, **stats}
        report["kill"]["at_most_one_shard_recomputed"] = report["kill"]["recomputed_samples"] <= stats["biggest_shard"]
        selection_equal = selection_equal and report["kill"]["selection_equal"] and bool(kill["killed"])
    report["selection_equal"] = selection_equal
    report["seconds"] = round(time.perf_counter() - t0, 1)
    for k, v in report.items():
        print(f"{k}: {v}")
    if args.json:
        print(json.dumps(report))
    return 0 if selection_equal else 1


def run(argv: list[str] | None = None) -> int:
    """`main`, with a failed job, dataset or process reported as one message (what failed and the
    worker's last log lines) and exit status 1 instead of a traceback."""
    try:
        return main(argv)
    except (RuntimeError, httpx.HTTPError) as exc:
        sys.stderr.write(f"scale: error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(run())
