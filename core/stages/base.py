"""The stage protocol: every stage is `stage(ds, cfg, ctx) -> StageOutput`.

`cfg` is the run's `RunConfig` (the pruning configuration, plus fine-tuning and evaluation when the
run has them); `ctx` is what the stage may use and leave behind: the device, the cache, progress and
cancel callbacks, the artifacts earlier stages wrote (a path per stage, so a stage on another worker
or device reads exactly what an earlier one wrote) and the in-process results of earlier stages
(`state`: the trained surrogate, the scores, the selection, ...). A stage takes its inputs from
`state` when an earlier stage ran in the same process, else from `artifacts`, else from the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.config import FinetuneConfig, LLMEvalConfig, PruneConfig
from core.data.dataset import RecDataset
from core.effort.prompts import PromptTemplate
from core.instrument import StageRecord
from core.progress import ProgressFn

CancelFn = Callable[[], bool]


class ArtifactMissing(RuntimeError):
    """An earlier stage's artifact is gone (e.g. the cache or the job's files were cleared)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything the stages of one run read."""

    prune: PruneConfig
    finetune: FinetuneConfig | None = None
    evaluate: LLMEvalConfig | None = None
    limit_users: int | None = None  # recorded in selection.json, so a later step loads the same slice
    # A surrogate checkpoint of a previous version of the data to warm-start from (None: from scratch).
    surrogate_init: Path | None = None


@dataclass
class StageContext:
    device: torch.device
    cache_dir: Path
    template: PromptTemplate = field(default_factory=PromptTemplate)
    store_root: Path | None = None  # the per-sample effort store's root (default: cache_dir)
    use_cache: bool = True
    progress: ProgressFn | None = None
    cancel: CancelFn | None = None
    out_dir: Path | None = None  # where "outputs" writes the selection files
    adapter_dir: Path | None = None  # where "finetune" writes the adapter and "evaluate" reads it
    records: dict[str, StageRecord] = field(default_factory=dict)  # time and memory per stage
    artifacts: dict[str, Path] = field(default_factory=dict)  # stage -> the file it wrote (or reused)
    state: dict[str, Any] = field(default_factory=dict)  # results of the stages run in this process

    def reporter(self, stage: str) -> Callable[[float, str], None] | None:
        """The (fraction, message) callback of one stage, or None without a progress callback."""
        if self.progress is None:
            return None
        return lambda frac, msg="": self.progress(stage, frac, msg)

    @property
    def scores(self) -> dict:
        return self.state.setdefault("scores", {})


@dataclass
class StageOutput:
    artifact: Path | None = None  # the file (or folder) the stage wrote or reused
    cached: bool = False  # reused from the cache instead of computed
    message: str = ""


Stage = Callable[[RecDataset, RunConfig, StageContext], StageOutput]
