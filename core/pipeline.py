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


def previous_surrogate(previous: RecDataset, cfg: PruneConfig, cache_dir: Path | None = None) -> Path | None:
    """The cached surrogate a run with `cfg` trained on `previous` (an earlier version of the data),
    or None when there is none: what an incremental run warm-starts from."""
    from core.stages.scoring import surrogate_key

    path = Path(cache_dir or default_cache_dir()) / surrogate_key(previous, cfg) / "surrogate.pt"
    return path if path.is_file() else None


def run_prune(ds: RecDataset, cfg: PruneConfig, *, device: str = "auto", cache_dir: Path | None = None,
              template: PromptTemplate | None = None, progress: ProgressFn | None = None,
              cancel: CancelFn | None = None, use_cache: bool = True,
              surrogate_init: Path | None = None, store_root: Path | None = None) -> PruneResult:
    """Score and select. `ds` is already loaded (and limited). Returns the selection, all scores
    (the effort as the selection used it, its raw norms as `effort_raw` when corrected, and each
    sample's `prompt_tokens`) and the selection's diagnostics. `surrogate_init`: a surrogate
    checkpoint of a previous version of the data to warm-start from (`previous_surrogate`).
    `store_root`: where the per-sample effort store lives (default the cache folder)."""
    ctx = StageContext(device=resolve_device(device), cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
                       template=template or PromptTemplate(), use_cache=use_cache, progress=progress, cancel=cancel,
                       store_root=Path(store_root) if store_root else None)
    stages = stages_for(cfg.selection.method, outputs=False)
    run = RunConfig(cfg, surrogate_init=surrogate_init)
    for stage in stages[1:]:  # the caller loaded `ds`
        run_stage(stage, ds, run, ctx)
    records = {**skipped(stages), **ctx.records}
    ordered = {s: records[s] for s in ("surrogate", "influence", "effort", "selection") if s in records}
    return PruneResult(ds, cfg, ctx.state["selection"], ctx.scores, ordered, ctx.state.get("surrogate_report"),
                       ctx.state.get("effort_info") or {}, ctx.state.get("diagnostics"))
