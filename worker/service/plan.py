"""Which stages a job runs, in order, and which Celery queue runs each (light: the API imports it).

The stages and their order are core's (`core.stages.stages_for`, from the method registry); this
module only adds where each runs: the LLM stages on `Settings.llm_queue`, the rest on `cpu`."""

from __future__ import annotations

from core.stages import stages_for
from worker.service.settings import Settings


def job_stages(method: str, finetune: bool = False, evaluate: bool = False) -> list[str]:
    """The stages of a prune job: those whose scores the method needs, the selection and its output
    files, then optionally fine-tuning the LLM on the selection and evaluating it."""
    return stages_for(method, outputs=True, finetune=finetune, evaluate=evaluate)


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
