"""Every stage by name behind the one protocol, and `run_stage`, which times it and records its
artifact."""

from __future__ import annotations

from core.data.dataset import RecDataset
from core.instrument import StageRecord, StageTimer
from core.stages.base import RunConfig, Stage, StageContext, StageOutput
from core.stages.effort import run_effort
from core.stages.llm import run_evaluate, run_finetune
from core.stages.scoring import run_influence, run_surrogate
from core.stages.select import run_outputs, run_selection

STAGES: dict[str, Stage] = {
    "surrogate": run_surrogate,
    "influence": run_influence,
    "effort": run_effort,
    "selection": run_selection,
    "outputs": run_outputs,
    "finetune": run_finetune,
    "evaluate": run_evaluate,
}


def run_stage(name: str, ds: RecDataset, cfg: RunConfig, ctx: StageContext) -> StageOutput:
    """Run one stage (not `load`, which the caller does: it builds `ds`), timed into
    `ctx.records[name]`; its artifact, if any, is recorded in `ctx.artifacts`."""
    try:
        stage = STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}") from None
    with StageTimer(ctx.records, name):
        out = stage(ds, cfg, ctx)
    rec = ctx.records[name]
    rec.cached = rec.cached or out.cached
    if out.artifact is not None:
        ctx.artifacts[name] = out.artifact
    return out


def skipped(stages: list[str]) -> dict[str, StageRecord]:
    """Records for the scoring stages a run did not need (reports list every stage)."""
    return {s: StageRecord(skipped=True) for s in ("surrogate", "influence", "effort") if s not in stages}
