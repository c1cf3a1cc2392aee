"""Creating a prune job: the checks, the resolved parameters, the record (with idempotency) and the
first task, in one place (the API's route only translates HTTP). The "crud" of the service layer."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from core.params import ParamsError
from core.selection.methods import method_names, required_scores
from worker.celery_app import TASK_RUN, send
from worker.service.dispatch import send_released
from worker.service.jobstore import JobStore, new_id
from worker.service.plan import first_queue
from worker.service.quotas import TenantQuotas
from worker.service.records import JobRecord
from worker.service.requests import PruneRequest, to_config, to_finetune_config
from worker.service.settings import Settings

log = logging.getLogger(__name__)


class JobRequestError(Exception):
    """A request the service refuses: an HTTP status, a stable code, a message and details."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def request_field(field: str) -> str:
    """core's config field (selection.lambda, surrogate.epochs) as the request names it."""
    section, _, rest = field.partition(".")
    if section == "selection" and rest in ("budget", "method", "seed"):
        return rest
    if section == "selection":
        return f"params.{rest}"
    if section in ("surrogate", "influence", "effort"):
        return f"params.{field}"
    return field


def create_prune_job(store: JobStore, celery, settings: Settings, llms: dict[str, str], tenant: str,
                     req: PruneRequest, idempotency_key: str | None = None, quotas: TenantQuotas | None = None
                     ) -> tuple[JobRecord, bool]:
    """(the job, whether it was created now): a new queued job with its first task sent, or the
    earlier job of the same tenant with the same Idempotency-Key and request; a job past the tenant's
    DEALREC_TENANT_MAX_RUNNING waits held in Redis (quotas.py) instead of being sent. Raises
    JobRequestError (404 unknown dataset, 409 dataset not ready, 422 parameters), StoreError
    (idempotency conflict) and QuotaExceeded (the tenant's job limit)."""
    dataset = store.get_dataset(req.dataset_id, tenant)
    if dataset is None:
        # The same answer for "does not exist" and "belongs to another tenant": nothing leaks.
        raise JobRequestError(404, "not_found", f"dataset {req.dataset_id} not found")
    if dataset.status != "ready":
        raise JobRequestError(409, "dataset_not_ready", f"dataset {req.dataset_id} is {dataset.status}, not ready",
                              dataset_status=dataset.status, errors=[e.model_dump() for e in dataset.errors] or None)
    needs_effort = "effort" in required_scores(req.method)
    if (needs_effort or req.finetune is not None) and not llms:  # DEALREC_LLMS=none
        field = "method" if needs_effort else "finetune"
        without = ", ".join(m for m in method_names() if "effort" not in required_scores(m))
        raise JobRequestError(422, "invalid_request", f"{field}: this server runs no LLM; choose a method without "
                              f"one ({without}) and no finetune", field=field)
    if (needs_effort or req.finetune is not None) and req.params.effort.llm not in llms:
        raise JobRequestError(422, "invalid_request", f"params.effort.llm: unknown model '{req.params.effort.llm}'; "
                              f"this server offers {', '.join(sorted(llms))}", field="params.effort.llm")
    stats = dataset.statistics or {}
    n_users = int(stats.get("samples", stats.get("users", 1)))  # "samples": users with a training sample
    n_samples = min(n_users, req.limit_users) if req.limit_users else n_users
    try:
        cfg = to_config(req, n_samples, device=settings.device)
        if req.finetune is not None:
            to_finetune_config(req, device=settings.device)
    except ParamsError as exc:  # core's cross-field rules
        field = request_field(exc.field)
        raise JobRequestError(422, "invalid_request", f"{field}: {exc.message}", field=field) from None
    body = req.model_dump(mode="json", by_alias=True)
    queue = first_queue(req.method, settings)
    params = {**cfg.model_dump(mode="json", by_alias=True), "limit_users": req.limit_users, "split": req.split}
    params["effort"]["llm"] = req.params.effort.llm  # the name the client used, never a server path
    job = JobRecord(id=new_id("job"), tenant=tenant, dataset_id=req.dataset_id, queue=queue, request=body,
                    params=params)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    quotas = quotas or TenantQuotas.from_settings(store, settings)
    # Raises QuotaExceeded (429) past the tenant's job limit. The job's first event ("job queued",
    # held or not) is written with it, before any worker can write one.
    admission = quotas.admit_job(job, idempotency_key, digest, announce=True)
    if admission.created and not admission.held:
        try:
            send(celery, TASK_RUN, [job.id, queue], queue)
        except Exception:
            # Never leave a job queued that no worker will ever see (failing it frees its quota slot).
            quotas.dispatched([job.id])
            store.transition(job.id, "failed", error={"code": "enqueue_failed",
                                                      "message": "the task queue refused the job"})
            store.add_event(job.id, "job failed: the task queue refused it", level="error")
            raise
        quotas.dispatched([job.id])
    # Older held jobs of the tenant whose release a dead process missed (rare: the reaper's job too).
    send_released(store, quotas, celery, [i for i in admission.send if i != job.id])
    return admission.job, admission.created
