"""The records the job store holds: datasets, jobs and job events (shared by the API and the workers)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DatasetStatus = Literal["validating", "ready", "invalid"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]

TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
# Allowed status changes. running -> running is a redelivered job resumed by another worker.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"running", "succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FileInfo(_Record):
    name: str
    bytes: int


class ErrorInfo(_Record):
    """What went wrong, for an API client: a stable `code` and a human `message`, plus the loader's
    file/line/field when a dataset is at fault."""

    code: str
    message: str
    file: str | None = None
    line: int | None = None
    field: str | None = None


class DatasetRecord(_Record):
    id: str
    tenant: str
    status: DatasetStatus = "validating"
    name: str | None = None
    files: list[FileInfo] = Field(default_factory=list)
    format: str | None = None
    statistics: dict[str, Any] | None = None
    fingerprint: str | None = None
    errors: list[ErrorInfo] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=utcnow)
    validated_at: datetime | None = None
    parent_id: str | None = None  # the dataset this version extends (POST /v1/datasets/{id}/versions)


class StageTiming(_Record):
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    cached: bool = False
    skipped: bool = False


class JobRecord(_Record):
    id: str
    tenant: str
    dataset_id: str
    status: JobStatus = "queued"
    queue: str = "cpu"
    stage: str | None = None
    progress: float = 0.0
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    request: dict[str, Any] = Field(default_factory=dict)  # the validated request, as sent to the worker
    params: dict[str, Any] | None = None  # every resolved parameter, once the worker has loaded the data
    stages: dict[str, StageTiming] = Field(default_factory=dict)
    completed_stages: list[str] = Field(default_factory=list)
    reused_stages: list[str] = Field(default_factory=list)
    # Stage -> artifact path relative to the cache root: a later stage, maybe on another worker and
    # another device, reads exactly what the earlier one wrote.
    artifacts: dict[str, str] = Field(default_factory=dict)
    effort_info: dict[str, Any] | None = None
    # The queue a finished task handed the job to; a task that finds it set is a continuation, one
    # that does not is a redelivery after its worker died.
    handoff: str | None = None
    # Which hand-off that is (a fresh token each time), and whether its task (or shard chord) reached
    # the broker: the reaper sends again a hand-off recorded but never sent (its worker died between).
    handoff_id: str | None = None
    handoff_sent: bool = False
    attempts: int = 0
    effort_rounds: int = 0  # times the effort stage was split into shard tasks (a round ends in a merge)
    worker: str | None = None  # host:pid of the worker that last ran it
    cancel_requested: bool = False
    # What the worker running the job does that cannot stop until it ends ("loading the LLM"): a
    # cancel meanwhile ends the job at once (JobStore.cancel_if_blocked).
    blocked: str | None = None
    error: ErrorInfo | None = None
    result: dict[str, Any] | None = None


class JobEvent(_Record):
    id: int
    created_at: datetime
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str
    data: dict[str, Any] = Field(default_factory=dict)
