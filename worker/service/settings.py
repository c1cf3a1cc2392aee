"""Service configuration, read from `DEALREC_*` environment variables (shared by the API and workers).

Plain environment parsing into a pydantic model: pydantic is already a core dependency, and one
`Settings.from_env()` keeps tests able to build a configuration without touching `os.environ`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from core.params import first_error

ENV_PREFIX = "DEALREC_"
# Stages that run the LLM: they go to `Settings.llm_queue` (a GPU worker's queue in a GPU deployment).
LLM_STAGES = frozenset({"effort", "finetune", "evaluate"})


class ConfigError(ValueError):
    """A `DEALREC_*` variable that cannot be used; the message names the variable."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = None  # default: redis_url
    result_backend_url: str | None = None  # default: redis_url
    key_prefix: str = "dealrec:"
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".local" / "share" / "dealrec")
    cache_dir: Path | None = None  # default: <data_dir>/cache (core's content-addressed cache)

    # Jobs
    job_ttl_s: int = Field(7 * 24 * 3600, ge=60)  # finished jobs (record, events, artifacts) expire after this
    task_time_limit_s: int = Field(6 * 3600, ge=10)  # one task: the stages of a job one queue runs in a row
    validate_time_limit_s: int = Field(1800, ge=10)
    # Celery's Redis transport redelivers an unacked message after this; it must exceed the longest
    # task or a still-running job is handed to a second worker (the job lock is the second guard).
    visibility_timeout_s: int | None = Field(None, ge=1)  # default: longest time limit + 10 %
    unacked_restore_interval_s: int = Field(10, ge=1)
    unacked_restore_throttle: int = Field(10, ge=1)
    lock_ttl_s: int = Field(60, ge=2)  # the running worker renews it every lock_ttl_s / 3
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The Celery queue of the LLM stages (effort, fine-tuning, evaluation); the others go to `cpu`.
    llm_queue: Literal["cpu", "gpu"] = "gpu"
    torch_threads: int | None = Field(None, ge=1)
    # The effort stage of a job is split into shard tasks of about this many prompt tokens (length-
    # balanced), which any number of workers on the LLM queue take; 0 = the job's own task scores it.
    effort_shard_tokens: int = Field(200_000, ge=0)
    progress_interval_s: float = Field(0.5, ge=0.0)  # least time between two progress writes
    llms: str = ""  # "name=path,..." models a request may name besides "auto"; "none": no model at all

    # Uploads
    max_upload_bytes: int = Field(1 << 30, ge=1)
    max_unpacked_bytes: int = Field(4 << 30, ge=1)
    max_archive_files: int = Field(1000, ge=1)
    # A temporary folder (a partial upload, a job's outputs being written) in which nothing changed
    # for this long is removed by the workers' periodic sweep.
    stale_upload_s: int = Field(900, ge=1)
    # How often one worker removes the folders of expired jobs and deleted datasets (each worker also
    # does at its start): without it a long-running service keeps every job's files forever.
    storage_sweep_s: int = Field(3600, ge=1)
    max_upload_files: int = Field(1000, ge=1)  # files in one plain multipart upload (archives: max_archive_files)
    # An archive that unpacks to more than this many times its own size is refused while it is
    # unpacked (a zip bomb); real data compresses 2-10x (the Games files: 2.2x).
    max_archive_ratio: float = Field(100.0, ge=1.0)

    # Per tenant (worker/service/quotas.py). Past one of the first four, the API answers 429 with
    # Retry-After: tenant_retry_after_s.
    tenant_max_jobs: int = Field(100, ge=1)  # queued + running jobs (those held for fair dispatch included)
    # Jobs of one tenant handed to the workers at once; its other queued jobs wait in a list of its
    # own in Redis, so one tenant's burst never stands in the broker's queue before another's job.
    tenant_max_running: int = Field(4, ge=1)
    tenant_max_datasets: int = Field(1000, ge=1)  # datasets kept (ready, validating or invalid)
    tenant_max_bytes: int = Field(100 << 30, ge=1)  # bytes of the datasets' stored files
    tenant_retry_after_s: int = Field(30, ge=1)

    # API
    api_keys: str = ""
    api_keys_file: Path | None = None
    auth_disabled: bool = False
    # The bearer token of /metrics (a scraper's, not a tenant's); empty: /metrics answers 404.
    metrics_token: str = ""
    # The operators' token of /metrics: the same series plus those of each tenant (its jobs, datasets,
    # stored bytes), which the plain token never shows; empty: no one sees them.
    metrics_admin_token: str = ""
    worker_heartbeat_s: float = Field(5.0, gt=0.0)

    @model_validator(mode="after")
    def _prefix_nonempty(self) -> Settings:
        if not self.key_prefix:
            raise ValueError("key_prefix must not be empty (every key the service writes carries it)")
        return self

    @field_validator("metrics_token", "metrics_admin_token")
    @classmethod
    def _token_long_enough(cls, token: str, info: ValidationInfo) -> str:
        token = token.strip()
        if token and len(token) < 16:
            off = "/metrics off" if info.field_name == "metrics_token" else "no series per tenant"
            raise ValueError(f"must be at least 16 characters (or empty: {off})")
        return token

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def backend(self) -> str:
        return self.result_backend_url or self.redis_url

    @property
    def cache_root(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"

    @property
    def visibility_timeout(self) -> int:
        if self.visibility_timeout_s is not None:
            return self.visibility_timeout_s
        return int(max(self.task_time_limit_s, self.validate_time_limit_s) * 1.1) + 60

    @property
    def tmp_sweep_period_s(self) -> float:
        """How often a worker looks for stale temporary folders: a tenth of their age limit, between
        the heartbeat period and a minute."""
        return min(60.0, max(self.worker_heartbeat_s, self.stale_upload_s / 10))

    def queue_of(self, stage: str) -> str:
        return self.llm_queue if stage in LLM_STAGES else "cpu"

    def llm_choices(self) -> dict[str, str]:
        """Request-side LLM names -> server paths. Clients name a model, never a path on this machine.
        `none`: no model at all, `auto` included: a server that runs only the methods without an LLM
        refuses every job that needs one (422) instead of loading the default model."""
        if self.llms.strip().lower() == "none":
            return {}
        out = {"auto": "auto"}
        for item in filter(None, (x.strip() for x in self.llms.split(","))):
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ConfigError(f"{ENV_PREFIX}LLMS entry '{item}' is not name=path")
            out[name.strip()] = path.strip()
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if environ is None else environ
        raw: dict = {}
        for name in cls.model_fields:
            value = env.get(ENV_PREFIX + name.upper())
            if value is not None and value != "":
                raw[name] = _parse_bool(value) if name == "auth_disabled" else value
        raw.update(overrides)
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            err = first_error(exc)
            field = err.field.split(".")[0] or "?"
            raise ConfigError(f"{ENV_PREFIX}{field.upper()}: {err.message}") from None


def _parse_bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (workers import them once; the API builds its own in create_app)."""
    return Settings.from_env()
