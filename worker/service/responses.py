"""Response models of the /v1 API (the request model is `worker.service.requests.PruneRequest`)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field

from worker.service.records import DatasetRecord, ErrorInfo, FileInfo, JobEvent, JobRecord, StageTiming, utcnow


class DatasetOut(BaseModel):
    id: str
    status: str
    name: str | None = None
    files: list[FileInfo]
    format: str | None = None
    statistics: dict[str, Any] | None = None
    fingerprint: str | None = None
    errors: list[ErrorInfo] = Field(default_factory=list)
    created_at: datetime
    validated_at: datetime | None = None
    parent_id: str | None = None  # the dataset this one is a version of

    @classmethod
    def of(cls, rec: DatasetRecord) -> DatasetOut:
        return cls.model_validate(rec.model_dump(exclude={"tenant"}))


class DatasetList(BaseModel):
    items: list[DatasetOut]
    next_cursor: str | None = None


class JobOut(BaseModel):
    id: str
    status: str
    dataset_id: str
    stage: str | None = None
    progress: float
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    estimated_finish: datetime | None = None
    queue: str
    params: dict[str, Any] | None = None
    request: dict[str, Any]
    stages: dict[str, StageTiming] = Field(default_factory=dict)
    completed_stages: list[str] = Field(default_factory=list)
    reused_stages: list[str] = Field(default_factory=list)
    attempts: int = 0
    cancel_requested: bool = False
    # A queued job waiting for one of its tenant's running jobs to end (fair dispatch,
    # DEALREC_TENANT_MAX_RUNNING): its place among the tenant's held jobs, 1 = next; null otherwise.
    held_position: int | None = None
    error: ErrorInfo | None = None
    result: dict[str, Any] | None = None

    @classmethod
    def of(cls, rec: JobRecord, held_position: int | None = None) -> JobOut:
        data = rec.model_dump(exclude={"tenant", "worker", "updated_at", "artifacts", "effort_info", "handoff",
                                      "handoff_id", "handoff_sent", "blocked"})
        data["estimated_finish"] = _eta(rec)
        data["held_position"] = held_position if rec.status == "queued" else None
        if rec.status == "succeeded" and rec.result is not None:
            base = f"/v1/jobs/{rec.id}"
            data["result"] = {**rec.result, "links": {
                "selection": f"{base}/selection?format=json", "selection_csv": f"{base}/selection?format=csv",
                "scores": f"{base}/scores?format=csv", "bigrec_train": f"{base}/bigrec_train.jsonl",
                "diagnostics": f"{base}/diagnostics",
                **({"adapter": f"{base}/adapter"} if "finetune" in rec.result else {})}}
        return cls.model_validate(data)


def _eta(rec: JobRecord) -> datetime | None:
    """Linear in the whole-job progress (stages weighted by their usual share of the time)."""
    if rec.status != "running" or rec.started_at is None or rec.progress < 0.02:
        return None
    now = utcnow()
    elapsed = (now - rec.started_at).total_seconds()
    # The weights are a CPU DEALRec run's; other methods can run ahead of them: never in the past.
    return max(now, rec.started_at + timedelta(seconds=elapsed / rec.progress))


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = None


class EventList(BaseModel):
    items: list[JobEvent]
    has_more: bool
    next_after: int = Field(description="pass as `after` to read on")
