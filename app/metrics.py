"""Prometheus text exposition (format 0.0.4), written by hand: a few gauges and counters do not
need a client library, and the numbers live in Redis anyway (every API process reads the same)."""

from __future__ import annotations

from collections.abc import Mapping

from worker.service.quotas import TenantUsage

ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def render_metrics(snap: dict[str, dict[str, float]], depth: dict[str, int], workers: int, up: int,
                   tenants: Mapping[str, TenantUsage] | None = None) -> str:
    """The exposition text. `tenants` (the admin token's scrape only) adds a series per tenant; without
    it no line names a tenant."""
    lines: list[str] = []

    def family(name: str, kind: str, help_: str, samples: list[tuple[str, dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for sample, labels, value in samples:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{sample}{{{lab}}} {_num(value)}" if lab else f"{sample} {_num(value)}")

    jobs = snap.get("jobs", {})
    family("dealrec_jobs", "gauge", "Jobs now queued or running.",
           [("dealrec_jobs", {"status": s}, max(0.0, jobs.get(s, 0.0))) for s in ACTIVE])
    family("dealrec_jobs_finished_total", "counter", "Jobs that reached a final status.",
           [("dealrec_jobs_finished_total", {"status": s}, jobs.get(s, 0.0)) for s in FINAL])
    secs, counts = snap.get("stage_seconds", {}), snap.get("stage_count", {})
    stage_samples: list[tuple[str, dict[str, str], float]] = []
    for stage in sorted(set(secs) | set(counts)):
        stage_samples.append(("dealrec_stage_duration_seconds_sum", {"stage": stage}, secs.get(stage, 0.0)))
        stage_samples.append(("dealrec_stage_duration_seconds_count", {"stage": stage}, counts.get(stage, 0.0)))
    family("dealrec_stage_duration_seconds", "summary",
           "Seconds spent computing each stage (stages reused from the cache are not counted).", stage_samples)
    family("dealrec_queue_depth", "gauge", "Messages waiting in each Celery queue.",
           [("dealrec_queue_depth", {"queue": q}, n) for q, n in sorted(depth.items())])
    family("dealrec_workers", "gauge", "Workers with a fresh heartbeat.", [("dealrec_workers", {}, workers)])
    family("dealrec_store_up", "gauge", "1 when the job store (Redis) answered this scrape.",
           [("dealrec_store_up", {}, up)])
    if tenants is not None:
        names = sorted(tenants)
        family("dealrec_tenant_jobs", "gauge",
               'Jobs of each tenant: state="active" = queued + running, held ones included (its '
               'DEALREC_TENANT_MAX_JOBS count); state="held" = those of them waiting for a dispatch slot.',
               [("dealrec_tenant_jobs", {"tenant": t, "state": state}, value) for t in names
                for state, value in (("active", tenants[t].active), ("held", tenants[t].held))])
        family("dealrec_tenant_datasets", "gauge",
               "Datasets each tenant keeps (its DEALREC_TENANT_MAX_DATASETS count).",
               [("dealrec_tenant_datasets", {"tenant": t}, tenants[t].datasets) for t in names])
        family("dealrec_tenant_stored_bytes", "gauge",
               "Bytes of each tenant's stored dataset files (its DEALREC_TENANT_MAX_BYTES count).",
               [("dealrec_tenant_stored_bytes", {"tenant": t}, tenants[t].bytes) for t in names])
    return "\n".join(lines) + "\n"
