"""Runs one prune job inside a worker: the store says what to do, core does it, the store hears how it went.

Resuming after a worker died needs no special path: core's content-addressed cache holds every
stage that finished (each written atomically), so the rerun skips them; the job record keeps the
stages completed by every attempt and which ones this attempt reused."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import redis
from celery.exceptions import SoftTimeLimitExceeded

from core.data import DataError, load_dataset
from core.effort.llm import LLMError
from core.effort.score import EffortCancelled
from core.influence import SolverDiverged
from core.outputs import write_outputs
from core.pipeline import StageTimer, bigrec_records, run_prune
from core.selection import required_scores
from core.surrogate.train import Cancelled
from worker.config import Settings
from worker.models import JobRecord
from worker.params import PruneRequest, to_config
from worker.progress import CancelCheck, JobReporter
from worker.storage import Storage
from worker.store import JobLock, Store, StoreError

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised by the runner itself when it sees the cancel flag outside core's loops."""


def job_stages(method: str) -> list[str]:
    needed = required_scores(method)
    stages = ["load"]
    if needed & {"influence", "grand", "el2n"}:
        stages += ["surrogate", "influence"]
    if "effort" in needed:
        stages.append("effort")
    return stages + ["selection", "outputs"]


def relative_error(exc: DataError, root: Path) -> dict:
    """The loader's error with the file named relative to the dataset: clients never see server paths."""
    info = exc.to_dict()
    if info.get("file"):
        try:
            rel = str(Path(info["file"]).resolve().relative_to(root.resolve()))
            info["file"] = None if rel == "." else rel  # the dataset folder itself: no file to name
        except ValueError:
            info["file"] = Path(info["file"]).name
    return info


def describe(info: dict) -> str:
    where = [x for x in (info.get("file"), f"line {info['line']}" if info.get("line") else None,
                         f"field '{info['field']}'" if info.get("field") else None) if x]
    return f"{', '.join(where)}: {info['message']}" if where else str(info["message"])


class JobRunner:
    def __init__(self, store: Store, storage: Storage, settings: Settings, job_id: str, lock: JobLock) -> None:
        self.store = store
        self.storage = storage
        self.settings = settings
        self.job_id = job_id
        self.lock = lock
        self.host = f"{socket.gethostname()}:{os.getpid()}"

    def run(self) -> str:
        """Run (or resume) the job; returns its final status, or 'abandoned' when this worker lost it."""
        job = self.store.get_job(self.job_id)
        if job is None or job.status not in ("queued", "running"):
            return job.status if job else "missing"
        first = job.status == "queued"
        try:
            self.store.transition(self.job_id, "running", attempts=job.attempts + 1, worker=self.host,
                                  **({"started_at": _now()} if first else {}))
        except StoreError as exc:  # cancelled between our read and now
            log.info("job %s not started: %s", self.job_id, exc)
            return exc.extra.get("status", "unknown")
        if first:
            self.store.add_event(self.job_id, "job started", worker=self.host)
        else:
            self.store.add_event(self.job_id, "job resumed after its worker stopped", level="warning",
                                 worker=self.host, attempt=job.attempts + 1, completed_stages=job.completed_stages)
        return self._execute(job)

    def _execute(self, job: JobRecord) -> str:
        req = PruneRequest.model_validate(job.request)
        stages = job_stages(req.method)
        reporter = JobReporter(self.store, self.job_id, stages, job.completed_stages, self.settings.progress_interval_s)
        cancel = CancelCheck(self.store, self.job_id, self.lock.lost,
                             time.monotonic() + self.settings.task_time_limit_s)
        tmp: Path | None = None
        files = self.storage.dataset_files(job.dataset_id)
        try:
            load_stage: dict = {}
            reporter("load", 0.0, "loading the dataset")
            dataset = self.store.get_dataset(job.dataset_id)
            with StageTimer(load_stage, "load"):
                ds = load_dataset(files, fmt=(dataset.format if dataset and dataset.format else "auto"),
                                  split=req.split, limit_users=req.limit_users)
            llm_path = self.settings.llm_choices().get(req.params.effort.llm, "auto")
            cfg = to_config(req, ds.n_users, device=self.settings.device, llm_path=llm_path)
            params = {**cfg.model_dump(mode="json", by_alias=True), "limit_users": req.limit_users,
                      "split": req.split}
            params["effort"]["llm"] = req.params.effort.llm  # the name the client used, not a server path
            self.store.update_job(self.job_id, allowed=["running"], params=params)
            reporter("load", 1.0, f"{ds.n_users} users, {ds.n_items} items")

            result = run_prune(ds, cfg, device=self.settings.device, cache_dir=self.settings.cache_root,
                               progress=reporter, cancel=cancel)
            reporter("outputs", 0.0, "writing the outputs")
            records = bigrec_records(ds, result.selection.selected, cfg.effort, self.settings.cache_root)
            if cancel():
                raise JobCancelled()
            tmp = self.storage.tmp_dir(f"job-{self.job_id}")
            write_outputs(result, tmp, records, req.limit_users)
            if cancel():  # last look before the outputs become visible
                raise JobCancelled()
            self.storage.publish(tmp, self.storage.job_dir(self.job_id))
            tmp = None
            reporter("outputs", 1.0, "outputs written")
            reporter.finish()
            timings = {**{k: vars(v) for k, v in load_stage.items()},
                       **{k: vars(v) for k, v in result.stages.items()}}
            reused = [k for k, v in result.stages.items() if v.cached]
            for name, rec in timings.items():
                if not rec["skipped"] and not rec["cached"]:
                    self.store.record_stage_time(name, rec["seconds"])
            outcome = {"n_selected": len(result.selection.selected), "n_samples": ds.n_users,
                       "budget": cfg.selection.budget, "notes": list(result.selection.notes),
                       "dataset_fingerprint": ds.fingerprint, "effort": result.effort_info or None}
            self.store.add_event(self.job_id, f"selected {outcome['n_selected']} of {ds.n_users} samples",
                                 n_selected=outcome["n_selected"], reused_stages=reused)
            self.store.transition(self.job_id, "succeeded", stage=None, progress=1.0, stages=timings,
                                  reused_stages=reused, result=outcome)
            self.store.add_event(self.job_id, "job succeeded")
            return "succeeded"
        except (Cancelled, EffortCancelled, JobCancelled):
            return self._stopped(cancel.reason or "cancelled")
        except DataError as exc:
            info = relative_error(exc, files)
            return self._fail("invalid_dataset", describe(info), **info)
        except LLMError as exc:
            return self._fail("llm_unavailable", str(exc))
        except SolverDiverged as exc:
            return self._fail("solver_diverged", str(exc))
        except ValueError as exc:
            return self._fail("invalid_params", str(exc))
        except StoreError as exc:
            log.warning("job %s: %s", self.job_id, exc)
            return exc.extra.get("status", "unknown")
        except SoftTimeLimitExceeded:  # prefork pools enforce Celery's limit; others rely on CancelCheck
            return self._fail("time_limit", f"the job ran longer than {self.settings.task_time_limit_s} s")
        except redis.RedisError:
            raise  # the task retries the job once the store is back
        except Exception as exc:  # noqa: BLE001 - a job must end in a status, whatever broke
            log.exception("job %s failed", self.job_id)
            return self._fail("internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            if tmp is not None:
                self.storage.remove(tmp)

    def _stopped(self, reason: str) -> str:
        if reason == "lock_lost":
            # Another worker owns the job now (or will): leave its record alone.
            log.error("job %s abandoned: its lock was lost", self.job_id)
            return "abandoned"
        if reason == "time_limit":
            return self._fail("time_limit", f"the job ran longer than {self.settings.task_time_limit_s} s")
        self.storage.remove(self.storage.job_dir(self.job_id))
        try:
            self.store.transition(self.job_id, "cancelled", stage=None,
                                  error={"code": "cancelled", "message": "cancelled by request"})
        except StoreError as exc:
            return exc.extra.get("status", "unknown")
        self.store.add_event(self.job_id, "job cancelled", level="warning")
        return "cancelled"

    def _fail(self, code: str, message: str, **extra) -> str:
        extra.pop("message", None)
        log.warning("job %s failed: %s: %s", self.job_id, code, message)
        self.storage.remove(self.storage.job_dir(self.job_id))
        try:
            self.store.transition(self.job_id, "failed", error={"code": code, "message": message, **extra})
        except StoreError as exc:
            return exc.extra.get("status", "unknown")
        self.store.add_event(self.job_id, f"job failed: {message}", level="error", code=code)
        return "failed"


def _now() -> str:
    from worker.models import utcnow

    return utcnow().isoformat()
