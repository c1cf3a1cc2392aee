"""The DEALRec pipeline as one function: load -> surrogate -> influence -> effort -> selection.

`run_prune` walks the stages `core.stages.stages_for` gives for the method (only the scoring stages
whose scores it needs) through the one stage protocol; the service's workers walk the same list, a
queue's share at a time. Each stage reports progress through a callback, honours a cancel callback
and reuses cached artifacts. Nothing here prints: the CLI and the worker render progress their own way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.cache import default_cache_dir
from core.config import PruneConfig
from core.data.dataset import RecDataset
from core.device import resolve_device
from core.effort.prompts import PromptTemplate
from core.instrument import StageRecord
from core.progress import ProgressFn
from core.selection import SelectionResult
from core.stages import stages_for
from core.stages.base import CancelFn, RunConfig, StageContext
from core.stages.run import run_stage, skipped


@dataclass
class PruneResult:
    dataset: RecDataset
    config: PruneConfig
    selection: SelectionResult
    scores: dict[str, np.ndarray]
    stages: dict[str, StageRecord] = field(default_factory=dict)
    surrogate_report: dict | None = None
    effort_info: dict = field(default_factory=dict)
    diagnostics: dict | None = None


def run_prune(ds: RecDataset, cfg: PruneConfig, *, device: str = "auto", cache_dir: Path | None = None,
              template: PromptTemplate | None = None, progress: ProgressFn | None = None,
              cancel: CancelFn | None = None, use_cache: bool = True) -> PruneResult:
    """Score and select. `ds` is already loaded (and limited). Returns the selection, all scores
    (the effort as the selection used it, its raw norms as `effort_raw` when corrected, and each
    sample's `prompt_tokens`) and the selection's diagnostics."""
    ctx = StageContext(device=resolve_device(device), cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
                       template=template or PromptTemplate(), use_cache=use_cache, progress=progress, cancel=cancel)
    stages = stages_for(cfg.selection.method, outputs=False)
    run = RunConfig(cfg)
    for stage in stages[1:]:  # the caller loaded `ds`
        run_stage(stage, ds, run, ctx)
    records = {**skipped(stages), **ctx.records}
    ordered = {s: records[s] for s in ("surrogate", "influence", "effort", "selection") if s in records}
    return PruneResult(ds, cfg, ctx.state["selection"], ctx.scores, ordered, ctx.state.get("surrogate_report"),
                       ctx.state.get("effort_info") or {}, ctx.state.get("diagnostics"))
