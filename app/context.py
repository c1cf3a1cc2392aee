"""What every request handler needs, built once per application: settings, the job store, the files, Celery."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from fastapi import Request

from app.errors import ApiError
from worker.celery_app import make_celery
from worker.service.files import Files
from worker.service.jobstore import JobStore, connect, is_valid_id
from worker.service.quotas import TenantQuotas
from worker.service.settings import Settings


@dataclass
class ServiceContext:
    settings: Settings
    store: JobStore
    files: Files
    celery: Celery
    broker: redis.Redis  # for queue depths; the store's client when broker and store share a Redis
    llms: dict[str, str]
    quotas: TenantQuotas  # the per-tenant limits and fair dispatch

    @classmethod
    def build(cls, settings: Settings) -> ServiceContext:
        store = JobStore.from_settings(settings)
        broker = store.r if settings.broker == settings.redis_url else connect(settings.broker)
        return cls(settings, store, Files(settings.data_dir), make_celery(settings), broker,
                   settings.llm_choices(), TenantQuotas.from_settings(store, settings))


def get_ctx(request: Request) -> ServiceContext:
    return request.app.state.ctx


def checked_id(kind: str, value: str, what: str) -> str:
    """Ids from URLs and bodies must have our exact shape before they touch Redis keys or paths."""
    if not is_valid_id(kind, value):
        raise ApiError(404, "not_found", f"{what} {value[:80]} not found")
    return value
