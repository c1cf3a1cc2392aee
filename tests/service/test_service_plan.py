"""How a job's stages split into tasks per queue (pure: no Redis, no worker)."""

from __future__ import annotations

import pytest

from worker.service.plan import first_queue, job_stages, next_segment
from worker.service.settings import Settings

GPU = Settings(llm_queue="gpu")
CPU_ONLY = Settings(llm_queue="cpu")


def test_stages_follow_the_method():
    assert job_stages("random") == ["load", "selection", "outputs"]
    assert job_stages("influence") == ["load", "surrogate", "influence", "selection", "outputs"]
    assert job_stages("effort") == ["load", "effort", "selection", "outputs"]
    assert job_stages("dealrec") == ["load", "surrogate", "influence", "effort", "selection", "outputs"]


@pytest.mark.parametrize("completed, queue, segment", [
    ([], "cpu", ["load", "surrogate", "influence"]),
    (["load"], "cpu", ["surrogate", "influence"]),
    (["load", "surrogate"], "cpu", ["influence"]),
    (["load", "surrogate", "influence"], "gpu", ["effort"]),
    (["load", "surrogate", "influence", "effort"], "cpu", ["selection", "outputs"]),
    (["load", "surrogate", "influence", "effort", "selection"], "cpu", ["outputs"]),
    (["load", "surrogate", "influence", "effort", "selection", "outputs"], None, []),
])
def test_dealrec_runs_as_cpu_then_gpu_then_cpu(completed, queue, segment):
    assert next_segment(job_stages("dealrec"), completed, GPU) == (queue, segment)


def test_effort_only_job_starts_on_the_llm_queue_with_its_load():
    assert first_queue("effort", GPU) == "gpu"
    assert next_segment(job_stages("effort"), [], GPU) == ("gpu", ["load", "effort"])
    assert first_queue("random", GPU) == "cpu"


def test_one_task_when_the_llm_queue_is_cpu():
    stages = job_stages("dealrec")
    assert next_segment(stages, [], CPU_ONLY) == ("cpu", stages)
    assert CPU_ONLY.queue_of("effort") == "cpu" and GPU.queue_of("effort") == "gpu"
    assert GPU.queue_of("finetune") == "gpu" and GPU.queue_of("selection") == "cpu"
