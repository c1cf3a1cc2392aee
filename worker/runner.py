"""Runs the stages of a prune job that one queue owns, inside a worker task.

A job is a chain of tasks: the stages on the `cpu` queue (surrogate, influence, selection,
outputs) and those on the LLM queue (effort; a GPU worker's in a GPU deployment) run in separate
tasks, each running its queue's stages in a row and then handing the job to the next queue. Every
stage writes its artifact atomically into core's content-addressed cache and records its path and
completion in the job store before the next begins, so a task redelivered after its worker died
resumes at the first unfinished stage, and a stage on another worker (another device, another
precision) reads exactly the artifact the earlier stage wrote."""

from __future__ import annotations

import json
import logging
import os
import socket
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
from celery.exceptions import SoftTimeLimitExceeded

from core.cache import load_arrays
from core.data import DataError, load_dataset
from core.effort.llm import LLMError
from core.effort.prompts import PromptTemplate
from core.effort.score import EffortCancelled
from core.influence import SolverDiverged
from core.outputs import write_outputs
from core.diagnostics import selection_diagnostics
from core.pipeline import (SCORE_ARRAYS, PruneResult, StageRecord, StageTimer, bigrec_records, effort_stage,
                           influence_stage, prompt_token_counts, resolve_device, selection_stage, surrogate_stage)
from core.selection import required_scores
from core.surrogate.train import Cancelled
from worker.config import Settings
from worker.models import JobRecord
from worker.params import PruneRequest, to_config, to_eval_config, to_finetune_config
from worker.plan import next_segment, request_stages
from worker.progress import CancelCheck, JobReporter
from worker.storage import Storage
from worker.store import JobLock, Store, StoreError

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised by the runner itself when it sees the cancel flag outside core's loops."""


class ArtifactMissing(RuntimeError):
    """An earlier stage's recorded artifact is gone from the cache (e.g. the cache was cleared)."""


@dataclass(frozen=True)
class Outcome:
    """What a task did: the job's status after it, and the queue it handed the job to (if any)."""

    status: str
    next_queue: str | None = None


def relative_error(exc: DataError, root: Path) -> dict:
    """The loader's error with the file named relative to the dataset and no server path in the
    message: clients never see server paths."""
    return exc.for_client(root)


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

    def run(self, queue: str) -> Outcome:
        """Run the job's unfinished stages that belong to `queue`, then hand it on or finish it."""
        job = self.store.get_job(self.job_id)
        if job is None or job.status not in ("queued", "running"):
            return Outcome(job.status if job else "missing")
        req = PruneRequest.model_validate(job.request)
        stages = request_stages(req)
        owner, segment = next_segment(stages, job.completed_stages, self.settings)
        if owner is None:  # every stage done: the task that finished them also ended the job
            return Outcome(job.status)
        if owner != queue:
            # A redelivered message whose stages were finished by the worker that died: pass the job
            # on to the queue of its first unfinished stage, as that worker was about to.
            log.info("job %s: stages of queue %s are done; handing it to %s", self.job_id, queue, owner)
            self.store.update_job(self.job_id, allowed=["queued", "running"], handoff=owner, queue=owner)
            return Outcome(job.status, owner)

        first = job.status == "queued"
        continuation = not first and job.handoff == queue
        fields: dict = {"worker": self.host, "handoff": None, "queue": queue}
        if first:
            fields.update(started_at=_now(), attempts=1)
        elif not continuation:
            fields["attempts"] = job.attempts + 1
        try:
            self.store.transition(self.job_id, "running", **fields)
        except StoreError as exc:  # cancelled between our read and now
            log.info("job %s not started: %s", self.job_id, exc)
            return Outcome(exc.extra.get("status", "unknown"))
        if first:
            self.store.add_event(self.job_id, "job started", worker=self.host, queue=queue)
        elif continuation:
            self.store.add_event(self.job_id, f"job continues on the {queue} queue", worker=self.host,
                                 stages=segment)
        else:
            self.store.add_event(self.job_id, "job resumed after its worker stopped", level="warning",
                                 worker=self.host, attempt=job.attempts + 1, completed_stages=job.completed_stages)
        return _Segment(self, job, req, stages, segment, queue).run()

    # Terminal states, shared with _Segment.

    def stopped(self, reason: str) -> Outcome:
        if reason == "lock_lost":
            # Another worker owns the job now (or will): leave its record alone.
            log.error("job %s abandoned: its lock was lost", self.job_id)
            return Outcome("abandoned")
        if reason == "time_limit":
            return self.fail("time_limit", f"a task of the job ran longer than {self.settings.task_time_limit_s} s")
        self.storage.remove(self.storage.job_dir(self.job_id))
        try:
            self.store.transition(self.job_id, "cancelled", stage=None, handoff=None,
                                  error={"code": "cancelled", "message": "cancelled by request"})
        except StoreError as exc:
            return Outcome(exc.extra.get("status", "unknown"))
        self.store.add_event(self.job_id, "job cancelled", level="warning")
        return Outcome("cancelled")

    def fail(self, code: str, message: str, **extra) -> Outcome:
        extra.pop("message", None)
        log.warning("job %s failed: %s: %s", self.job_id, code, message)
        self.storage.remove(self.storage.job_dir(self.job_id))
        try:
            self.store.transition(self.job_id, "failed", handoff=None,
                                  error={"code": code, "message": message, **extra})
        except StoreError as exc:
            return Outcome(exc.extra.get("status", "unknown"))
        self.store.add_event(self.job_id, f"job failed: {message}", level="error", code=code)
        return Outcome("failed")


class _Segment:
    """One task's run of consecutive stages of one job (all on one queue)."""

    def __init__(self, runner: JobRunner, job: JobRecord, req: PruneRequest, stages: list[str],
                 segment: list[str], queue: str) -> None:
        self.r = runner
        self.store, self.settings, self.job_id = runner.store, runner.settings, runner.job_id
        self.job, self.req, self.stages, self.segment, self.queue = job, req, stages, segment, queue
        self.completed = list(job.completed_stages)
        self.reused = list(job.reused_stages)
        self.artifacts = dict(job.artifacts)
        self.effort_info = dict(job.effort_info or {})
        self.timings = {k: v.model_dump() for k, v in job.stages.items()}
        self.records: dict[str, StageRecord] = {}  # this task's stage timings
        self.reporter = JobReporter(self.store, self.job_id, stages, self.completed, self.settings.progress_interval_s)
        self.cancel = CancelCheck(self.store, self.job_id, runner.lock.lost,
                                  time.monotonic() + self.settings.task_time_limit_s)
        self.files = runner.storage.dataset_files(job.dataset_id)
        self.dev = resolve_device(self.settings.device)
        self.cache = self.settings.cache_root
        self.model = None  # the surrogate, once trained or loaded in this task
        self.scores: dict[str, np.ndarray] = {}
        self.selection = None
        self.result: dict = dict(job.result or {})  # what the client sees once the job succeeded
        self.tmp: Path | None = None

    def run(self) -> Outcome:
        try:
            if self.cancel():  # cancelled while it waited in the queue: not even the data is loaded
                raise JobCancelled()
            self._load()
            for stage in self.segment:
                if stage == "load":
                    continue
                if self.cancel():
                    raise JobCancelled()
                getattr(self, f"_{stage}")()
                last = stage == self.stages[-1]
                self._complete(stage, final=last)
                if last:
                    self._finish()
                    return Outcome("succeeded")
            nxt, _ = next_segment(self.stages, self.completed, self.settings)
            self.store.update_job(self.job_id, allowed=["running"], handoff=nxt, queue=nxt)
            return Outcome("running", nxt)
        except (Cancelled, EffortCancelled, JobCancelled):
            return self.r.stopped(self.cancel.reason or "cancelled")
        except DataError as exc:
            info = relative_error(exc, self.files)
            return self.r.fail("invalid_dataset", describe(info), **info)
        except LLMError as exc:
            return self.r.fail("llm_unavailable", str(exc))
        except SolverDiverged as exc:
            return self.r.fail("solver_diverged", str(exc))
        except ArtifactMissing as exc:
            return self.r.fail("artifact_missing", str(exc))
        except ValueError as exc:
            return self.r.fail("invalid_params", str(exc))
        except StoreError as exc:
            log.warning("job %s: %s", self.job_id, exc)
            return Outcome(exc.extra.get("status", "unknown"))
        except SoftTimeLimitExceeded:  # prefork pools enforce Celery's limit; others rely on CancelCheck
            return self.r.stopped("time_limit")
        except redis.RedisError:
            raise  # the task retries once the store is back; finished stages stay finished
        except Exception as exc:  # noqa: BLE001 - a job must end in a status, whatever broke
            log.exception("job %s failed", self.job_id)
            return self.r.fail("internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            if self.tmp is not None:
                self.r.storage.remove(self.tmp)

    # ------------------------------------------------------------------ stages

    def _load(self) -> None:
        """Every task loads the dataset (cheap next to any stage); the first also records `load`."""
        first = "load" in self.segment
        if first:
            self.reporter("load", 0.0, "loading the dataset")
        dataset = self.store.get_dataset(self.job.dataset_id)
        with StageTimer(self.records, "load"):
            self.ds = load_dataset(self.files, fmt=(dataset.format if dataset and dataset.format else "auto"),
                                   split=self.req.split, limit_users=self.req.limit_users)
        llm_path = self.settings.llm_choices().get(self.req.params.effort.llm, "auto")
        self.cfg = to_config(self.req, self.ds.n_users, device=self.settings.device, llm_path=llm_path)
        if first:
            params = {**self.cfg.model_dump(mode="json", by_alias=True), "limit_users": self.req.limit_users,
                      "split": self.req.split}
            params["effort"]["llm"] = self.req.params.effort.llm  # the name the client used, not a server path
            self.store.update_job(self.job_id, allowed=["running"], params=params)
            self.reporter("load", 1.0, f"{self.ds.n_users} users, {self.ds.n_items} items")
            self._complete("load")
        else:
            self.records.pop("load")

    def _progress(self, stage: str):
        return lambda frac, msg="": self.reporter(stage, frac, msg)

    def _surrogate(self) -> None:
        self.reporter("surrogate", 0.0, "training the surrogate")
        self.model, _, path = surrogate_stage(self.ds, self.cfg, self.dev, self.cache, self.records,
                                              self._progress("surrogate"), self.cancel)
        self.artifacts["surrogate"] = self._rel(path)

    def _influence(self) -> None:
        if self.model is None:  # trained by an earlier task: load its checkpoint
            self.model, _, path = surrogate_stage(self.ds, self.cfg, self.dev, self.cache, {}, None, self.cancel)
            self.artifacts["surrogate"] = self._rel(path)
            if "surrogate" not in self.reused:
                self.reused.append("surrogate")
        self.reporter("influence", 0.0, "scoring influence")
        arrays, path = influence_stage(self.model, self.ds, self.cfg, self.dev, self.cache, self.records,
                                       self._progress("influence"), self.cancel)
        self.scores.update(arrays)
        self.artifacts["influence"] = self._rel(path)

    def _effort(self) -> None:
        self.reporter("effort", 0.0, "scoring effort with the LLM")
        effort, info, path, tokens = effort_stage(self.ds, self.cfg.effort, self.dev, self.cache, PromptTemplate(),
                                                  self.records, self._progress("effort"), self.cancel)
        self.scores["effort"] = effort
        self.scores["prompt_tokens"] = tokens
        self.effort_info = info
        self.artifacts["effort"] = self._rel(path)

    def _selection(self) -> None:
        self.reporter("selection", 0.0, "selecting")
        self._read_scores()
        self.selection = selection_stage(self.ds, self.cfg, self.scores, self.records, self._progress("selection"))

    def _outputs(self) -> None:
        if self.selection is None:  # resumed between selection and outputs: selecting again is cheap
            self._read_scores()
            self.selection = selection_stage(self.ds, self.cfg, self.scores, {}, None)
        self.reporter("outputs", 0.0, "writing the outputs")
        if "prompt_tokens" not in self.scores:
            self.scores["prompt_tokens"] = prompt_token_counts(self.ds, self.cfg.effort, self.cache)
        diagnostics = selection_diagnostics(self.ds, self.selection, self.scores, self.scores["prompt_tokens"])
        result = PruneResult(self.ds, self.cfg, self.selection, self.scores, self.records, None, self.effort_info,
                             diagnostics)
        records = bigrec_records(self.ds, self.selection.selected, self.cfg.effort, self.cache)
        if self.cancel():
            raise JobCancelled()
        self.tmp = self.r.storage.tmp_dir(f"job-{self.job_id}")
        with StageTimer(self.records, "outputs"):
            write_outputs(result, self.tmp, records, self.req.limit_users)
        if self.cancel():  # last look before the outputs become visible
            raise JobCancelled()
        self.r.storage.publish(self.tmp, self.r.storage.job_dir(self.job_id))
        self.tmp = None
        self.reporter("outputs", 1.0, "outputs written")
        n = len(self.selection.selected)
        self.result = {"n_selected": n, "n_samples": self.ds.n_users, "budget": self.cfg.selection.budget,
                       "notes": list(self.selection.notes), "dataset_fingerprint": self.ds.fingerprint,
                       "effort": self._effort_summary()}
        self.store.add_event(self.job_id, f"selected {n} of {self.ds.n_users} samples", n_selected=n,
                             reused_stages=self.reused)

    def _selected_indices(self) -> list[int]:
        """The selection this job published (fine-tuning may run in a later task than selection)."""
        if self.selection is not None:
            return [int(i) for i in self.selection.selected]
        path = self.r.storage.job_file(self.job_id, "selection.json")
        try:
            return [int(s["index"]) for s in json.loads(path.read_text())["selected"]]
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactMissing(f"the selection of this job is no longer stored ({exc})") from None

    def _finetune(self) -> None:
        from core.finetune import run_finetune

        self.reporter("finetune", 0.0, "fine-tuning the LLM on the selection")
        cfg = to_finetune_config(self.req, device=self.settings.device, llm_path=self._llm_path())
        job_dir = self.r.storage.job_dir(self.job_id)
        adapter = job_dir / "adapter"
        self.r.storage.remove(adapter)  # a partial one from a worker that died
        with StageTimer(self.records, "finetune"):
            meta = run_finetune(self.ds, self._selected_indices(), cfg, adapter, cache_dir=self.cache,
                                progress=self._progress("finetune"), cancel=self.cancel,
                                extra_meta={"job_id": self.job_id})
            _tar_atomically(adapter, job_dir / "adapter.tar.gz")
        meta["base_model"] = {k: v for k, v in meta["base_model"].items() if k != "path"}  # no server paths
        self.result["finetune"] = {k: meta.get(k) for k in (
            "epochs_run", "best_epoch", "stopped_early", "steps", "train_samples", "valid_samples",
            "train_seconds", "seconds_per_sample", "precision", "selection_fingerprint", "base_model")}
        self.result["finetune"]["recipe"] = {k: v for k, v in meta["recipe"].items() if k not in ("llm", "adapter")}

    def _evaluate(self) -> None:
        from core.evaluate.bigrec import run_evaluate

        adapter = self.r.storage.job_dir(self.job_id) / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise ArtifactMissing("the fine-tuned adapter of this job is no longer stored")
        cfg = to_eval_config(self.req, str(adapter), device=self.settings.device, llm_path=self._llm_path())
        spans = {"load": (0.0, 0.05), "items": (0.05, 0.35), "generate": (0.35, 0.95), "ground": (0.95, 1.0)}

        def progress(part: str, frac: float, msg: str = "") -> None:
            lo, hi = spans.get(part, (0.95, 1.0))
            self.reporter("evaluate", lo + (hi - lo) * frac, f"{part}: {msg}" if msg else part)

        self.reporter("evaluate", 0.0, "evaluating the fine-tuned LLM")
        with StageTimer(self.records, "evaluate"):
            out = run_evaluate(self.ds, cfg, cache_dir=self.cache, progress=progress, cancel=self.cancel)
        metrics = dict(out["metrics"])  # recall@K, ndcg@K, users
        tmp = self.r.storage.job_dir(self.job_id) / ".metrics.json.tmp"
        tmp.write_text(json.dumps({**metrics, "seconds": out.get("seconds")}, indent=2, default=float))
        os.replace(tmp, self.r.storage.job_file(self.job_id, "metrics.json"))
        self.result["metrics"] = metrics

    def _effort_summary(self) -> dict | None:
        """How effort was computed, naming the LLM as the client did (never a server path)."""
        if not self.effort_info:
            return None
        return {**{k: v for k, v in self.effort_info.items() if k != "llm"}, "llm": self.req.params.effort.llm}

    def _llm_path(self) -> str:
        return self.settings.llm_choices().get(self.req.params.effort.llm, "auto")

    def _finish(self) -> None:
        for stage in ("surrogate", "influence", "effort"):  # the method's unneeded stages, as core reports them
            if stage not in self.timings:
                self.timings[stage] = {k: v for k, v in vars(StageRecord(skipped=True)).items()
                                       if k != "child_peak_rss_mb"}
        self.store.transition(self.job_id, "succeeded", stage=None, progress=1.0, handoff=None, stages=self.timings,
                              completed_stages=self.completed, reused_stages=self.reused, result=self.result)
        self.store.add_event(self.job_id, "job succeeded")

    # ------------------------------------------------------------------ bookkeeping

    def _read_scores(self) -> None:
        """The scores the method needs, from the artifacts the earlier stages recorded."""
        needed = required_scores(self.cfg.selection.method)
        wanted = {"influence": SCORE_ARRAYS} if needed & set(SCORE_ARRAYS) else {}
        if "effort" in needed:
            wanted["effort"] = ("effort",)
        for stage, names in wanted.items():
            if all(n in self.scores for n in names):
                continue
            rel = self.artifacts.get(stage)
            arrays = load_arrays(self.cache / rel) if rel else None
            if arrays is None or any(n not in arrays for n in names):
                raise ArtifactMissing(f"the {stage} scores of this job are no longer in the cache ({rel})")
            self.scores.update({n: arrays[n] for n in names})
            if stage == "effort" and "prompt_tokens" in arrays:
                self.scores["prompt_tokens"] = arrays["prompt_tokens"]

    def _rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.cache))

    def _complete(self, stage: str, final: bool = False) -> None:
        """Record a finished stage: its timing, artifact and completion, in one write."""
        rec = self.records.get(stage, StageRecord())
        if rec.cached and stage not in self.reused:
            self.reused.append(stage)
        if not rec.cached and not rec.skipped:
            self.store.record_stage_time(stage, rec.seconds)
        self.timings[stage] = {k: v for k, v in vars(rec).items() if k != "child_peak_rss_mb"}
        if stage not in self.completed:
            self.completed.append(stage)
        self.reporter.complete(stage, rec.seconds)
        if not final:  # the last stage's record is written with the job's final status
            self.store.update_job(self.job_id, allowed=["running"], completed_stages=self.completed,
                                  stages=self.timings, artifacts=self.artifacts, reused_stages=self.reused,
                                  effort_info=self.effort_info or None, result=self.result or None)


def _tar_atomically(folder: Path, target: Path) -> None:
    """`folder`'s files as a .tar.gz named after the folder, written beside `target` then renamed."""
    tmp = target.with_name(f".{target.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(Path(folder.name) / path.relative_to(folder)))
    os.replace(tmp, target)


def _now() -> str:
    from worker.models import utcnow

    return utcnow().isoformat()
