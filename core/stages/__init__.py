"""The stages of a run, in one order, behind one protocol (`stage(ds, cfg, ctx) -> StageOutput`,
see `base`), and which of them a run needs.

    load -> surrogate -> influence -> effort -> selection -> outputs -> finetune -> evaluate

A method runs only the scoring stages whose scores it needs (the selection registry says which);
`outputs` writes the selection files; `finetune` and `evaluate` are optional. `run_prune`
(core/pipeline.py), `dealrec prune` and the service's workers all walk `stages_for(...)` and call
`run_stage`: the order is written here and nowhere else.

Modules: `base` (the protocol: RunConfig, StageContext, StageOutput), `run` (the stage functions
by name, `run_stage`), `scoring` (surrogate, influence, effort), `select` (selection, outputs), `llm`
(finetune, evaluate). This module itself is light (no torch): the API plans jobs with it.
"""

from __future__ import annotations

from core.selection.methods import SCORE_STAGE, required_scores

ORDER = ("load", "surrogate", "influence", "effort", "selection", "outputs", "finetune", "evaluate")


def stages_for(method: str, *, outputs: bool = True, finetune: bool = False, evaluate: bool = False) -> list[str]:
    """The stages a run of `method` goes through, in order: load, the scoring stages its scores need
    (the surrogate before influence), selection, and optionally outputs, fine-tuning and evaluation
    (evaluation only after fine-tuning)."""
    needed = {SCORE_STAGE[name] for name in required_scores(method)}
    if "influence" in needed:
        needed.add("surrogate")
    wanted = {"load", "selection", *needed}
    if outputs:
        wanted.add("outputs")
    if finetune:
        wanted.add("finetune")
        if evaluate:
            wanted.add("evaluate")
    return [s for s in ORDER if s in wanted]


__all__ = ["ORDER", "stages_for"]
