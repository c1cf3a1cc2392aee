"""Cancellation around a load that cannot poll the cancel callback (issue 14): core checks it right
before and right after loading the LLM, in fine-tuning, evaluation and effort scoring, and tells a
callback that offers `blocking(what)` while the load runs (the service marks the job then)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from tiny_llm import tiny_dataset, tiny_model_folder

from core.config import EffortConfig, FinetuneConfig, LLMEvalConfig
from core.effort.prompts import PromptTemplate
from core.effort.score import EffortCancelled
from core.evaluate.bigrec import EvaluationCancelled, run_evaluate
from core.finetune import FinetuneCancelled, run_finetune
from core.progress import uninterruptible
from core.stages.effort import effort_pool, fill_pool


class Cancel:
    """A cancel callback answering `answers` in turn (then False), recording its blocking stretches."""

    def __init__(self, *answers: bool) -> None:
        self.answers = list(answers)
        self.log: list[str] = []

    def __call__(self) -> bool:
        self.log.append("asked")
        return self.answers.pop(0) if self.answers else False

    @contextmanager
    def blocking(self, what: str):
        self.log.append(f"enter {what}")
        try:
            yield
        finally:
            self.log.append(f"exit {what}")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return str(tiny_model_folder(tmp_path_factory.mktemp("tiny-llm")))


def test_uninterruptible_checks_before_and_after():
    ran = []
    with pytest.raises(RuntimeError, match="before loading"), uninterruptible(Cancel(True), RuntimeError, "loading"):
        ran.append(1)
    assert ran == []
    cancel = Cancel(False, True)
    with pytest.raises(RuntimeError, match="while loading"), uninterruptible(cancel, RuntimeError, "loading"):
        ran.append(1)
    assert ran == [1] and cancel.log == ["asked", "enter loading", "exit loading", "asked"]
    with uninterruptible(None, RuntimeError, "loading"), uninterruptible(lambda: False, RuntimeError, "loading"):
        ran.append(2)  # plain callbacks (the CLI's) and none at all
    assert ran == [1, 2]


def test_finetune_stops_right_after_the_load(llm, tmp_path):
    """A cancel that came while the LLM loaded: nothing is trained and nothing written."""
    ds = tiny_dataset(12, with_eval=True)
    cfg = FinetuneConfig(llm=llm, epochs=1, batch_size=4, micro_batch_size=2)
    cancel = Cancel(False, True)
    with pytest.raises(FinetuneCancelled, match="while loading the LLM"):
        run_finetune(ds, [0, 1, 2], cfg, tmp_path / "adapter", cache_dir=tmp_path / "cache", cancel=cancel)
    assert cancel.log == ["asked", "enter loading the LLM", "exit loading the LLM", "asked"]
    assert not (tmp_path / "adapter").exists()


def test_evaluate_and_effort_stop_right_after_the_load(llm, tmp_path):
    ds = tiny_dataset(12, with_eval=True)
    with pytest.raises(EvaluationCancelled, match="while loading the LLM"):
        run_evaluate(ds, LLMEvalConfig(llm=llm, test_users=3, num_beams=1, max_new_tokens=4),
                     cache_dir=tmp_path / "cache", cancel=Cancel(False, True))
    cfg, cpu = EffortConfig(llm=llm, device="cpu", processes=1), torch.device("cpu")
    pool = effort_pool(ds, cfg, cpu, tmp_path / "cache", PromptTemplate(), use_cache=False)
    cancel = Cancel(False, True)
    with pytest.raises(EffortCancelled, match="while loading the LLM"):
        fill_pool(pool, cfg, cpu, tmp_path / "cache", PromptTemplate(), cancel=cancel)
    assert "enter loading the LLM" in cancel.log
    with pytest.raises(EffortCancelled, match="before loading the LLM"):
        fill_pool(pool, cfg, cpu, tmp_path / "cache", PromptTemplate(), cancel=Cancel(True))
