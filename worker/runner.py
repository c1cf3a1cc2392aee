"""Runs the stages of a prune job that one queue owns, inside a worker task.

A job is a chain of tasks: the stages on the `cpu` queue (surrogate, influence, selection,
outputs) and those on the LLM queue (effort; a GPU worker's in a GPU deployment) run in separate
tasks, each running its queue's stages in a row and then handing the job to the next queue. Every
stage writes its artifact atomically into core's content-addressed cache and records its path and
completion in the job store before the next begins, so a task redelivered after its worker died
resumes at the first unfinished stage, and a stage on another worker (another device, another
precision) reads exactly the artifact the earlier stage wrote.

The stages and their order are core's (`core.stages`): this module runs them through the one stage
protocol and adds only what a job needs around them (the job record, the events, the job's files,
the result a client sees)."""

from __future__ import annotations

import json
import logging
import os
import socket
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from celery.exceptions import SoftTimeLimitExceeded

from core.data import DataError, load_dataset
from core.device import resolve_device
from core.effort.llm import LLMError
from core.effort.score import EffortCancelled
from core.influence import SolverDiverged
from core.instrument import StageRecord, StageTimer
from core.stages.base import ArtifactMissing, RunConfig, StageContext
from core.stages.llm import evaluation_journal
from core.stages.run import run_stage, skipped
from core.surrogate.train import Cancelled
from worker.deliveries import PARKED_CODE, PARKED_JOB, Delivery
from worker.progress import CancelCheck, JobReporter
from worker.service.files import Files
from worker.service.handoffs import record_handoff
from worker.service.jobstore import JobLock, JobStore, StoreError
from worker.service.plan import next_segment, request_stages
from worker.service.records import JobRecord
from worker.service.requests import PruneRequest, to_config, to_eval_config, to_finetune_config
from worker.service.settings import Settings

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised by the runner itself when it sees the cancel flag outside core's loops."""


SHARDS = "effort-shards"  # the handoff of a job whose effort stage its shard tasks are computing
MAX_SHARD_ROUNDS = 3  # shard rounds before the job's own task scores what is still missing


@dataclass(frozen=True)
class Outcome:
    """What a task did: the job's status after it, the queue it handed the job to (if any), and the
    number of effort shard tasks to send (their chord continues the job on `shard_queue`)."""

    status: str
    next_queue: str | None = None
    shards: int = 0
    shard_queue: str | None = None
    handoff_id: str | None = None  # the recorded hand-off that sending next_queue / the shards fulfils


def relative_error(exc: DataError, root: Path) -> dict:
    """The loader's error with the file named relative to the dataset and no server path in the
    message: clients never see server paths."""
    return exc.for_client(root)


def describe(info: dict) -> str:
    where = [x for x in (info.get("file"), f"line {info['line']}" if info.get("line") else None,
                         f"field '{info['field']}'" if info.get("field") else None) if x]
    return f"{', '.join(where)}: {info['message']}" if where else str(info["message"])


class JobRunner:
    def __init__(self, store: JobStore, files: Files, settings: Settings, job_id: str, lock: JobLock) -> None:
        self.store = store
        self.files = files
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
            token = record_handoff(self.store, self.job_id, owner, allowed=["queued", "running"], queue=owner)
            return Outcome(job.status, owner, handoff_id=token)

        # Counted per job and first stage to run: a segment whose worker died twice at the same
        # stage is not run a third time (a stage finished meanwhile starts a new count). `load` is
        # recorded at the start of the first task, so it does not count as progress.
        stage = next((s for s in segment if s != "load"), segment[0])
        with Delivery(self.store, f"job:{self.job_id}:{stage}") as delivery:
            if delivery.parked:
                return self.fail(PARKED_CODE, PARKED_JOB, stage=stage)
            return self._start(job, req, stages, segment, queue)

    def _start(self, job: JobRecord, req: PruneRequest, stages: list[str], segment: list[str],
               queue: str) -> Outcome:
        first = job.status == "queued"
        continuation = not first and job.handoff in (queue, SHARDS)
        # `blocked` may be left by a worker that died while loading the LLM.
        fields: dict = {"worker": self.host, "handoff": None, "queue": queue, "blocked": None}
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
        elif continuation and job.handoff == SHARDS:
            self.store.add_event(self.job_id, "job continues after its effort shards", worker=self.host,
                                 stages=segment)
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
        self.files.remove(self.files.job_dir(self.job_id))
        try:
            self.store.transition(self.job_id, "cancelled", stage=None, handoff=None,
                                  error={"code": "cancelled", "message": "cancelled by request"})
        except StoreError as exc:
            return Outcome(exc.extra.get("status", "unknown"))
        self.store.add_event(self.job_id, "job cancelled", level="warning")
        return Outcome("cancelled")

    def fail(self, code: str, message: str, /, **extra) -> Outcome:
        extra.pop("message", None)  # a loader error dict passed as **extra: `message` (positional) says it whole
        log.warning("job %s failed: %s: %s", self.job_id, code, message)
        self.files.remove(self.files.job_dir(self.job_id))
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
        self.artifacts = dict(job.artifacts)  # stage -> path relative to the cache root
        self.effort_info = dict(job.effort_info or {})
        self.timings = {k: v.model_dump() for k, v in job.stages.items()}
        self.reporter = JobReporter(self.store, self.job_id, stages, self.completed, self.settings.progress_interval_s)
        self.cancel = CancelCheck(self.store, self.job_id, runner.lock.lost,
                                  time.monotonic() + self.settings.task_time_limit_s)
        self.dataset_dir = runner.files.dataset_files(job.dataset_id)
        self.job_dir = runner.files.job_dir(self.job_id)
        self.cache = self.settings.cache_root
        self.ctx = StageContext(device=resolve_device(self.settings.device), cache_dir=self.cache,
                                progress=self.reporter, cancel=self.cancel, out_dir=self.job_dir,
                                adapter_dir=self.job_dir / "adapter",
                                artifacts={k: self.cache / v for k, v in self.artifacts.items()})
        self.result: dict = dict(job.result or {})  # what the client sees once the job succeeded
        self.shards_handoff: str | None = None  # the token of this task's hand-off to effort shards
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
                if stage == "effort" and (shards := self._dispatch_shards()):
                    return Outcome("running", shards=shards, shard_queue=self.queue, handoff_id=self.shards_handoff)
                self._stage(stage)
                last = stage == self.stages[-1]
                self._complete(stage, final=last)
                if last:
                    self._finish()
                if stage == "evaluate":  # recorded in the job now: its generation journal has served
                    evaluation_journal(self.ctx.adapter_dir).unlink(missing_ok=True)
                if last:
                    return Outcome("succeeded")
            nxt, _ = next_segment(self.stages, self.completed, self.settings)
            token = record_handoff(self.store, self.job_id, nxt, allowed=["running"], queue=nxt)
            return Outcome("running", nxt, handoff_id=token)
        except (Cancelled, EffortCancelled, JobCancelled):
            return self.r.stopped(self.cancel.reason or "cancelled")
        except DataError as exc:
            info = relative_error(exc, self.dataset_dir)
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
                self.r.files.remove(self.tmp)

    # ------------------------------------------------------------------ stages

    def _load(self) -> None:
        """Every task loads the dataset (cheap next to any stage); the first also records `load`."""
        first = "load" in self.segment
        if first:
            self.reporter("load", 0.0, "loading the dataset")
        dataset = self.store.get_dataset(self.job.dataset_id)
        with StageTimer(self.ctx.records, "load"):
            self.ds = load_dataset(self.dataset_dir, fmt=(dataset.format if dataset and dataset.format else "auto"),
                                   split=self.req.split, limit_users=self.req.limit_users)
        llm_path = self._llm_path()
        prune = to_config(self.req, self.ds.n_samples, device=self.settings.device, llm_path=llm_path)
        finetune = evaluate = None
        if self.req.finetune is not None:
            finetune = to_finetune_config(self.req, device=self.settings.device, llm_path=llm_path)
            if self.req.finetune.evaluate is not None:
                evaluate = to_eval_config(self.req, str(self.ctx.adapter_dir), device=self.settings.device,
                                          llm_path=llm_path)
        init = None
        if self.req.warm_start and dataset is not None and dataset.parent_id and \
                {"surrogate", "influence"} & set(self.segment):
            init = self._previous_surrogate(dataset, prune, announce=first or "surrogate" in self.segment)
        self.cfg = RunConfig(prune, finetune, evaluate, self.req.limit_users, surrogate_init=init)
        self.ctx.state["finetune_extra_meta"] = {"job_id": self.job_id}
        if first:
            params = {**prune.model_dump(mode="json", by_alias=True), "limit_users": self.req.limit_users,
                      "split": self.req.split}
            params["effort"]["llm"] = self.req.params.effort.llm  # the name the client used, not a server path
            self.store.update_job(self.job_id, allowed=["running"], params=params)
            self.reporter("load", 1.0, f"{self.ds.n_users} users ({self.ds.n_samples} with a training sample), "
                                        f"{self.ds.n_items} items")
            self._complete("load")
        else:
            self.ctx.records.pop("load")

    def _previous_surrogate(self, dataset, prune, announce: bool) -> Path | None:
        """The surrogate a job with the same settings trained on the previous version of this
        dataset, to warm-start from (None: that version or its surrogate is gone)."""
        from core.pipeline import previous_surrogate

        parent = self.store.get_dataset(dataset.parent_id)
        found = None
        if parent is not None and parent.status == "ready" and self.r.files.dataset_files(parent.id).is_dir():
            previous = load_dataset(self.r.files.dataset_files(parent.id), fmt=parent.format or "auto",
                                    split=self.req.split, limit_users=self.req.limit_users)
            found = previous_surrogate(previous, prune, self.cache)
        if announce:
            self.store.add_event(self.job_id, "surrogate warm-started from the previous version's" if found else
                                 "no surrogate of the previous version with these settings: trained from scratch",
                                 parent_id=dataset.parent_id)
        return found

    _STARTING = {"surrogate": "training the surrogate", "influence": "scoring influence",
                 "effort": "scoring effort with the LLM", "selection": "selecting",
                 "finetune": "fine-tuning the LLM on the selection", "evaluate": "evaluating the fine-tuned LLM"}

    def _stage(self, stage: str) -> None:
        """One of core's stages through the stage protocol, with what the job adds around it."""
        if stage in self._STARTING and not (stage == "effort" and self.job.handoff == SHARDS):
            self.reporter(stage, 0.0, self._STARTING[stage])
        surrogate_in_memory = "surrogate" in self.ctx.state
        if stage == "outputs":
            # Written aside, published whole: a client never sees half the files.
            self.tmp = self.r.files.tmp_dir(f"job-{self.job_id}")
            self.ctx.out_dir = self.tmp
        elif stage == "finetune":
            self.r.files.remove(self.ctx.adapter_dir)  # a partial one from a worker that died
        out = run_stage(stage, self.ds, self.cfg, self.ctx)
        if stage in ("surrogate", "influence", "effort") and out.artifact is not None:
            self.artifacts[stage] = str(Path(out.artifact).relative_to(self.cache))
        if stage == "surrogate" and self.ctx.state.get("surrogate_report"):
            report = self.ctx.state["surrogate_report"]
            self.result["surrogate"] = {k: report.get(k) for k in ("best_epoch", "epochs_run", "train_seconds")}
            self.result["surrogate"]["warm_start"] = self.cfg.surrogate_init is not None
        if stage == "influence" and not surrogate_in_memory and "surrogate" not in self.reused:
            self.reused.append("surrogate")  # trained by an earlier task: loaded from its checkpoint
        if stage == "effort":
            self._merge_shards()
            self.effort_info = dict(self.ctx.state.get("effort_info") or {})
        elif stage == "outputs":
            self._publish()
        elif stage == "finetune":
            self._finetune_result()
        elif stage == "evaluate":
            self._evaluate_result()

    def _dispatch_shards(self) -> int:
        """Split the samples the store does not hold yet into shard tasks (the task sends them, with
        this job's continuation as their chord's body). 0 = no sharding: nothing is missing, it is
        off, or earlier rounds left samples unscored (they are scored here, in this task)."""
        if not self.settings.effort_shard_tokens:
            return 0
        from core.stages.effort import effort_pool, plan_shards

        pool = effort_pool(self.ds, self.cfg.prune.effort, self.ctx.device, self.cache, self.ctx.template)
        missing = pool.missing
        if not missing.size:
            return 0
        rounds = self.store.get_job(self.job_id).effort_rounds
        if rounds >= MAX_SHARD_ROUNDS:
            log.warning("job %s: %d samples still unscored after %d shard rounds: scoring them here",
                        self.job_id, missing.size, rounds)
            return 0
        lengths = pool.tokens[missing]
        shards = [[int(pool.users[missing[i]]) for i in part]
                  for part in plan_shards(lengths.tolist(), self.settings.effort_shard_tokens)]
        position = {u: i for i, u in enumerate(pool.users)}
        tokens = [int(sum(len(pool.samples[position[u]].ids) for u in part)) for part in shards]
        self.store.plan_shards(self.job_id, shards, tokens)
        self.shards_handoff = record_handoff(self.store, self.job_id, SHARDS, allowed=["running"],
                                             effort_rounds=rounds + 1, stage="effort")
        self.store.add_event(self.job_id, f"effort: {missing.size} of {len(pool.samples)} samples to score in "
                             f"{len(shards)} shard tasks ({len(pool.samples) - missing.size} from the store)",
                             shards=len(shards), to_score=int(missing.size), round=rounds + 1)
        return len(shards)

    def _merge_shards(self) -> None:
        """After shard tasks scored the effort: the stage's time is theirs (from dispatch to now) and
        the samples they scored count as scored, not as found in the store."""
        plan = self.store.shard_plan(self.job_id)
        if plan is None:
            return
        info = self.ctx.state.setdefault("effort_info", {})
        scored = int(plan["to_score"])
        info.update(scored=scored, from_store=self.ds.n_samples - scored, shards=len(plan["plan"]), cached=False)
        rec = self.ctx.records["effort"]
        rec.seconds, rec.cached = max(rec.seconds, time.time() - float(plan["started"])), False
        self.store.drop_shards(self.job_id)

    def _publish(self) -> None:
        if self.cancel():  # last look before the outputs become visible
            raise JobCancelled()
        self.r.files.publish(self.tmp, self.job_dir)
        self.tmp = None
        self.ctx.out_dir = self.job_dir
        selection = self.ctx.state["selection"]
        n = len(selection.selected)
        self.result.update({"n_selected": n, "n_samples": self.ds.n_samples, "budget": self.cfg.prune.selection.budget,
                            "notes": list(selection.notes), "dataset_fingerprint": self.ds.fingerprint,
                            "effort": self._effort_summary()})
        self.store.add_event(self.job_id, f"selected {n} of {self.ds.n_samples} samples", n_selected=n,
                             reused_stages=self.reused)

    def _finetune_result(self) -> None:
        _tar_atomically(self.ctx.adapter_dir, self.job_dir / "adapter.tar.gz")
        meta = dict(self.ctx.state["finetune"])
        meta["base_model"] = {k: v for k, v in meta["base_model"].items() if k != "path"}  # no server paths
        self.result["finetune"] = {k: meta.get(k) for k in (
            "epochs_run", "best_epoch", "stopped_early", "steps", "train_samples", "valid_samples",
            "train_seconds", "seconds_per_sample", "precision", "selection_fingerprint", "base_model")}
        self.result["finetune"]["recipe"] = {k: v for k, v in meta["recipe"].items() if k not in ("llm", "adapter")}

    def _evaluate_result(self) -> None:
        out = self.ctx.state["evaluation"]
        metrics = dict(out["metrics"])  # recall@K, ndcg@K, users, rank_pct, nll
        tmp = self.job_dir / ".metrics.json.tmp"
        tmp.write_text(json.dumps({**metrics, "seconds": out.get("seconds")}, indent=2, default=float))
        os.replace(tmp, self.r.files.job_file(self.job_id, "metrics.json"))
        self.result["metrics"] = metrics

    def _effort_summary(self) -> dict | None:
        """How effort was computed, naming the LLM as the client did (never a server path)."""
        if not self.effort_info:
            return None
        return {**{k: v for k, v in self.effort_info.items() if k != "llm"}, "llm": self.req.params.effort.llm}

    def _llm_path(self) -> str:
        return self.settings.llm_choices().get(self.req.params.effort.llm, "auto")

    def _finish(self) -> None:
        for stage, rec in skipped(self.stages).items():  # the method's unneeded stages, as core reports them
            self.timings.setdefault(stage, {k: v for k, v in vars(rec).items() if k != "child_peak_rss_mb"})
        self.store.transition(self.job_id, "succeeded", stage=None, progress=1.0, handoff=None, stages=self.timings,
                              completed_stages=self.completed, reused_stages=self.reused, result=self.result)
        self.store.add_event(self.job_id, "job succeeded")

    # ------------------------------------------------------------------ bookkeeping

    def _complete(self, stage: str, final: bool = False) -> None:
        """Record a finished stage: its timing, artifact and completion, in one write."""
        rec = self.ctx.records.get(stage, StageRecord())
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
    from worker.service.records import utcnow

    return utcnow().isoformat()
