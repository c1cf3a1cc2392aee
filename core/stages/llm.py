"""The optional stages after a selection: LoRA fine-tuning of the LLM on the selected samples, and
the BIGRec evaluation of the fine-tuned adapter."""

from __future__ import annotations

from pathlib import Path

from core.data.dataset import RecDataset
from core.progress import Phases
from core.stages.base import ArtifactMissing, RunConfig, StageContext, StageOutput
from core.stages.select import selected_indices

# Share of an evaluation's time per phase (the item titles are embedded once per LLM, then cached).
EVALUATE_PHASES = Phases({"load": 0.05, "items": 0.3, "generate": 0.6, "ground": 0.05})


def run_finetune(ds: RecDataset, cfg: RunConfig, ctx: StageContext) -> StageOutput:
    """The adapter and its finetune.json into `ctx.adapter_dir` (replaced atomically)."""
    from core.finetune import run_finetune as finetune

    if cfg.finetune is None or ctx.adapter_dir is None:
        raise ValueError("the finetune stage needs a fine-tuning config and an adapter folder")
    # A task retried after its worker died (or a rerun after Ctrl-C) resumes the training loop.
    meta = finetune(ds, selected_indices(ctx), cfg.finetune, ctx.adapter_dir, cache_dir=ctx.cache_dir,
                    template=ctx.template, progress=ctx.reporter("finetune"), cancel=ctx.cancel,
                    extra_meta=ctx.state.get("finetune_extra_meta"), checkpoint=finetune_checkpoint(ctx.adapter_dir))
    ctx.state["finetune"] = meta
    return StageOutput(ctx.adapter_dir)


def run_evaluate(ds: RecDataset, cfg: RunConfig, ctx: StageContext) -> StageOutput:
    """BIGRec evaluation of the adapter in `ctx.adapter_dir`; the result goes to state["evaluation"]."""
    from core.evaluate.bigrec import run_evaluate as evaluate

    if cfg.evaluate is None or ctx.adapter_dir is None:
        raise ValueError("the evaluate stage needs an evaluation config and an adapter folder")
    if not (ctx.adapter_dir / "adapter_config.json").is_file():
        raise ArtifactMissing("the fine-tuned adapter of this run is no longer stored")
    report = ctx.reporter("evaluate")

    def progress(phase: str, frac: float, msg: str = "") -> None:
        if report is not None:
            report(EVALUATE_PHASES.fraction(phase, frac), f"{phase}: {msg}" if msg else phase)

    # Generation can take hours: a retried task resumes after the batches its journal holds (the
    # runner removes it once the job's record holds the evaluation).
    ctx.state["evaluation"] = evaluate(ds, evaluation_config(cfg, ctx), cache_dir=ctx.cache_dir,
                                       use_cache=ctx.use_cache, template=ctx.template, progress=progress,
                                       cancel=ctx.cancel, journal=evaluation_journal(ctx.adapter_dir))
    return StageOutput()


def finetune_checkpoint(adapter_dir: Path) -> Path:
    """Where an unfinished fine-tuning into `adapter_dir` keeps its loop state (beside the folder,
    which is replaced as a whole when training ends)."""
    adapter_dir = Path(adapter_dir).absolute()
    return adapter_dir.with_name(f"{adapter_dir.name}.resume.pt")


def evaluation_journal(adapter_dir: Path) -> Path:
    """Where an unfinished evaluation of the adapter in `adapter_dir` journals its generation batches."""
    adapter_dir = Path(adapter_dir).absolute()
    return adapter_dir.with_name(f"{adapter_dir.name}.evaluate.partial.jsonl")


def evaluation_config(cfg: RunConfig, ctx: StageContext):
    """The evaluation config pointing at the adapter this run fine-tuned."""
    return cfg.evaluate.model_copy(update={"adapter": str(ctx.adapter_dir)})

