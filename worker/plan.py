"""Which stages a job runs, in order, and which Celery queue runs each (light: the API imports it)."""

from __future__ import annotations

from core.selection import required_scores
from worker.config import Settings


def job_stages(method: str, finetune: bool = False, evaluate: bool = False) -> list[str]:
    """The stages of a prune job: only those whose scores the method needs, then optionally
    fine-tuning the LLM on the selection and evaluating it."""
    needed = required_scores(method)
    stages = ["load"]
    if needed & {"influence", "grand", "el2n"}:
        stages += ["surrogate", "influence"]
    if "effort" in needed:
        stages.append("effort")
    stages += ["selection", "outputs"]
    if finetune:
        stages.append("finetune")
        if evaluate:
            stages.append("evaluate")
    return stages


def request_stages(req) -> list[str]:
    """The stages of a job from its `PruneRequest`."""
    ft = req.finetune
    return job_stages(req.method, ft is not None, ft is not None and ft.evaluate is not None)


def first_queue(method: str, settings: Settings) -> str:
    """The queue of a new job's first task: the queue of its first stage after loading."""
    return settings.queue_of(job_stages(method)[1])


def next_segment(stages: list[str], completed: list[str], settings: Settings) -> tuple[str | None, list[str]]:
    """(queue, stages): the unfinished stages that one task on one queue runs in a row, from the
    first unfinished stage to the next one on another queue. `load` goes with whatever follows it:
    every task loads the dataset anyway. (None, []) when nothing is left."""
    pending = [s for s in stages if s not in completed]
    if not pending:
        return None, []
    queue = settings.queue_of(next((s for s in pending if s != "load"), pending[0]))
    segment = []
    for stage in pending:
        if stage != "load" and settings.queue_of(stage) != queue:
            break
        segment.append(stage)
    return queue, segment
