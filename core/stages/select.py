"""The stages after scoring: the selection (with the effort's length correction and the
selection's diagnostics) and the output files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from core.cache import default_cache_dir, load_arrays
from core.config import EffortConfig, PruneConfig
from core.data.dataset import RecDataset
from core.effort.prompts import PromptTemplate
from core.selection import SCORE_STAGE, SelectionResult, required_scores, select
from core.stages.base import ArtifactMissing, RunConfig, StageContext, StageOutput

log = logging.getLogger(__name__)


def apply_effort_correction(scores: dict[str, np.ndarray], cfg: EffortConfig) -> None:
    """In place: with a length correction configured, `effort` becomes the corrected score the
    selection uses and `effort_raw` keeps the norms (applied to `effort_raw` when present, so calling
    this twice changes nothing)."""
    from core.effort.length import correct_effort

    if "effort" not in scores or cfg.length_correction == "none":
        return
    raw = scores.setdefault("effort_raw", scores["effort"])
    scores["effort"] = correct_effort(raw, scores.get("prompt_tokens"), cfg.length_correction)


def selection_stage(ds: RecDataset, cfg: PruneConfig, scores: dict[str, np.ndarray], progress=None) -> SelectionResult:
    """Select from the scores (`scores` gets the corrected effort, see `apply_effort_correction`)."""
    apply_effort_correction(scores, cfg.effort)
    needed = required_scores(cfg.selection.method)
    result = select(cfg.selection.method, {k: v for k, v in scores.items() if k in needed}, cfg.selection,
                    n_samples=ds.n_samples)
    if progress:
        progress(1.0, f"selected {len(result.selected)} of {ds.n_samples}")
    for note in result.notes:
        log.info("selection: %s", note)
    if len(result.selected) < cfg.selection.budget:
        log.warning("selected %d samples, fewer than the budget %d", len(result.selected), cfg.selection.budget)
    return result


def bigrec_records(ds: RecDataset, users, cfg: EffortConfig, cache_dir: Path | None = None,
                   template: PromptTemplate | None = None):
    """Instruction/input/output records of `users`, cut to `cutoff_len` tokens of the configured
    LLM's tokenizer exactly as the effort stage cuts them (only the tokenizer is loaded)."""
    from core.effort.llm import load_tokenizer, resolve_llm
    from core.effort.prompts import make_record, tokenize_samples

    template = template or PromptTemplate()
    tokenizer = load_tokenizer(resolve_llm(cfg.llm, cfg.gguf_file),
                               Path(cache_dir) if cache_dir else default_cache_dir())
    users = [int(u) for u in users]
    cut = tokenize_samples(ds, users, tokenizer, cfg.cutoff_len, template)
    return [make_record(ds, u, template, s.kept) for u, s in zip(users, cut)]


# ----------------------------------------------------------------------------------------------
# Behind the stage protocol


def scores_for_selection(cfg: RunConfig, ctx: StageContext) -> dict[str, np.ndarray]:
    """The scores the method needs: from this process, else from the artifacts the scoring stages
    recorded (another task, maybe another worker, computed them). Raises ArtifactMissing."""
    scores = ctx.scores
    for name in sorted(required_scores(cfg.prune.selection.method)):
        if name in scores:
            continue
        stage = SCORE_STAGE[name]
        path = ctx.artifacts.get(stage)
        arrays = load_arrays(path) if path else None
        if arrays is None or name not in arrays:
            raise ArtifactMissing(f"the {stage} scores of this run are no longer stored ({path})")
        scores.update({k: v for k, v in arrays.items() if k not in scores})
    return scores


def run_selection(ds: RecDataset, cfg: RunConfig, ctx: StageContext) -> StageOutput:
    from core.diagnostics import selection_diagnostics
    from core.stages.effort import prompt_token_counts

    scores = scores_for_selection(cfg, ctx)
    result = selection_stage(ds, cfg.prune, scores, ctx.reporter("selection"))
    if "prompt_tokens" not in scores:  # a method without the effort stage: the tokenizer alone
        scores["prompt_tokens"] = prompt_token_counts(ds, cfg.prune.effort, ctx.cache_dir, ctx.template)
    ctx.state["selection"] = result
    ctx.state["diagnostics"] = selection_diagnostics(ds, result, scores, scores["prompt_tokens"])
    return StageOutput(message=f"selected {len(result.selected)} of {ds.n_samples}")


def run_outputs(ds: RecDataset, cfg: RunConfig, ctx: StageContext) -> StageOutput:
    """selection.json / .csv, scores.csv, bigrec_train.jsonl and diagnostics.json into `ctx.out_dir`
    (a selection resumed in another task is made again: selecting is cheap and deterministic)."""
    from core.outputs import write_outputs
    from core.pipeline import PruneResult

    if ctx.out_dir is None:
        raise ValueError("the outputs stage needs an output folder")
    if "selection" not in ctx.state:
        run_selection(ds, cfg, ctx)
    report = ctx.reporter("outputs")
    if report:
        report(0.0, "writing the outputs")
    result = PruneResult(ds, cfg.prune, ctx.state["selection"], ctx.scores, ctx.records,
                         ctx.state.get("surrogate_report"), ctx.state.get("effort_info") or {},
                         ctx.state.get("diagnostics"))
    records = bigrec_records(ds, result.selection.selected, cfg.prune.effort, ctx.cache_dir, ctx.template)
    if ctx.cancel is not None and ctx.cancel():
        from core.surrogate.train import Cancelled

        raise Cancelled("cancelled before writing the outputs")
    write_outputs(result, ctx.out_dir, records, cfg.limit_users)
    if report:
        report(1.0, "outputs written")
    return StageOutput(ctx.out_dir)


def selected_indices(ctx: StageContext) -> list[int]:
    """The run's selection: from this process, else the selection.json the outputs stage wrote."""
    if "selection" in ctx.state:
        return [int(i) for i in ctx.state["selection"].selected]
    path = Path(ctx.out_dir or ".") / "selection.json"
    try:
        return [int(s["index"]) for s in json.loads(path.read_text())["selected"]]
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactMissing(f"the selection of this run is no longer stored ({exc})") from None
