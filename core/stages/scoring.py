"""The scoring stages: the surrogate, its influence scores (with GraNd and EL2N), and the LLM's
effort score (core/stages/effort.py). Each writes its artifact atomically into core's
content-addressed cache, keyed by the dataset fingerprint and exactly the parameters it depends on,
and reuses it when present.

`surrogate_stage` and `influence_stage` take explicit arguments (the bench and the tests call them);
`run_surrogate` and `run_influence` are the same stages behind the stage protocol (core/stages/base.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from core.cache import cache_key, load_arrays, save_arrays
from core.config import PruneConfig, key_dump
from core.data.dataset import RecDataset
from core.stages.base import RunConfig, StageContext, StageOutput

log = logging.getLogger(__name__)


def surrogate_key(ds: RecDataset, cfg: PruneConfig, init: Path | None = None) -> str:
    """The surrogate's cache key; a warm-started one also names the checkpoint it started from (by
    its own key: content-addressed) and, when that checkpoint carries its Adam state, that the state
    was carried over (a different training); a cold one keeps the key it always had."""
    from core.surrogate.train import has_optimizer_state

    warm = {}
    if init is not None:
        warm = {"warm_from": Path(init).parent.name}
        if has_optimizer_state(init):
            warm["warm_optimizer"] = "carried"
    return cache_key("surrogate", data=ds.fingerprint, cfg=key_dump(cfg.surrogate), seed=cfg.seed, **warm)


def influence_key(ds: RecDataset, cfg: PruneConfig, init: Path | None = None) -> str:
    return cache_key("influence", surrogate=surrogate_key(ds, cfg, init), cfg=key_dump(cfg.influence),
                     seed=cfg.seed)


def surrogate_stage(ds, cfg, dev, cache_dir, progress=None, cancel=None, use_cache=True, init: Path | None = None):
    """(model, training report, checkpoint path, reused from the cache): trained, or loaded. `init`:
    a checkpoint (of a previous version of the data) to warm-start from."""
    from core.surrogate.train import load_checkpoint, load_warm_start, save_checkpoint, train_surrogate_state

    path = cache_dir / surrogate_key(ds, cfg, init) / "surrogate.pt"
    if use_cache and path.is_file():
        try:
            model, extra = load_checkpoint(path, device=dev)
            log.info("surrogate: reusing the cached model %s", path.parent.name)
            if progress:
                progress(1.0, "reused cached surrogate")
            return model, json.loads(extra.get("report_json", "null")), path, True
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            log.warning("surrogate cache %s unreadable (%s): retraining", path, exc)
    state = optimizer = None
    if init is not None:
        state, optimizer = load_warm_start(init, device=dev)
        log.info("surrogate: warm start from %s%s", Path(init).parent.name,
                 "" if optimizer is not None else " (saved without its Adam state: a fresh one)")
    torch.manual_seed(cfg.seed)
    model, report, opt_state = train_surrogate_state(ds, cfg.surrogate, cfg.seed, device=dev, progress=progress,
                                                     cancel=cancel, init_state=state, init_optimizer=optimizer)
    if use_cache:
        save_checkpoint(model, path, {"report_json": json.dumps(report, default=float), "fingerprint": ds.fingerprint},
                        optimizer=opt_state)
    return model, report, path, False


SCORE_ARRAYS = ("influence", "grand", "el2n")


def influence_stage(model, ds, cfg, dev, cache_dir, progress=None, cancel=None,
                    use_cache=True, init: Path | None = None) -> tuple[dict[str, np.ndarray], Path, bool]:
    """({influence, grand, el2n} per sample, path of their .npz, reused from the cache) from the
    trained surrogate (`init`: the checkpoint that surrogate was warm-started from, for the key)."""
    from core.influence import influence_scores

    path = cache_dir / influence_key(ds, cfg, init) / "scores.npz"
    cached = load_arrays(path) if use_cache else None
    if cached is not None and all(k in cached for k in SCORE_ARRAYS):
        log.info("influence: reusing cached scores %s", path.parent.name)
        if progress:
            progress(1.0, "reused cached influence scores")
        return {k: cached[k] for k in SCORE_ARRAYS}, path, True
    out = influence_scores(model, ds, cfg.influence, cfg.seed, device=dev, progress=progress, cancel=cancel)
    arrays = {k: np.asarray(out[k], dtype=np.float64) for k in SCORE_ARRAYS}
    if use_cache:
        save_arrays(path, **arrays)
    return arrays, path, False


# ----------------------------------------------------------------------------------------------
# Behind the stage protocol


def run_surrogate(ds: RecDataset, cfg: RunConfig, ctx: StageContext) -> StageOutput:
    model, report, path, cached = surrogate_stage(ds, cfg.prune, ctx.device, ctx.cache_dir, ctx.reporter("surrogate"),
                                                  ctx.cancel, ctx.use_cache, cfg.surrogate_init)
    ctx.state["surrogate"], ctx.state["surrogate_report"] = model, report
    return StageOutput(path, cached)


def trained_surrogate(ds: RecDataset, cfg: RunConfig, ctx: StageContext):
    """The surrogate a "surrogate" stage trained: from this process, else its checkpoint."""
    if "surrogate" not in ctx.state:
        model, report, _, _ = surrogate_stage(ds, cfg.prune, ctx.device, ctx.cache_dir, None, ctx.cancel,
                                              init=cfg.surrogate_init)
        ctx.state["surrogate"], ctx.state["surrogate_report"] = model, report
    return ctx.state["surrogate"]


def run_influence(ds: RecDataset, cfg: RunConfig, ctx: StageContext) -> StageOutput:
    model = trained_surrogate(ds, cfg, ctx)
    arrays, path, cached = influence_stage(model, ds, cfg.prune, ctx.device, ctx.cache_dir, ctx.reporter("influence"),
                                           ctx.cancel, ctx.use_cache, cfg.surrogate_init)
    ctx.scores.update(arrays)
    return StageOutput(path, cached)


