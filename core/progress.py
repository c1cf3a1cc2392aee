"""Progress as one fraction: the one weighting mechanism, for the phases inside a stage (influence:
gradients, solve, scores; evaluation: load, items, generate, ground) and for the stages of a whole
run or job (`STAGE_WEIGHTS`).

Core reports progress through callbacks, never prints: the CLI draws a bar per stage, the worker
writes a stage and a fraction to the job store. Cancellation is a callback too (`CancelFn`, polled
between batches); `uninterruptible` marks what cannot poll it (loading an LLM).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext

ProgressFn = Callable[[str, float, str], None]  # (stage, fraction of that stage, message)
FractionFn = Callable[[float, str], None]  # (fraction, message)
CancelFn = Callable[[], bool]  # True: stop at the next batch

# Rough share of a CPU DEALRec run's time per stage (fine-tuning and evaluation, optional, outweigh
# the whole selection on a CPU), so that one fraction can describe a job.
STAGE_WEIGHTS: dict[str, float] = {"load": 0.01, "surrogate": 0.14, "influence": 0.05, "effort": 0.79,
                                   "selection": 0.01, "outputs": 0.01, "finetune": 1.0, "evaluate": 0.5}
DEFAULT_WEIGHT = 0.01


class Phases:
    """Consecutive parts with weights, each reporting its own 0..1 progress, mapped onto one 0..1
    range: part i at fraction f is (weights before i + w_i * f) / total."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not weights or any(w < 0 for w in weights.values()):
            raise ValueError("phases need at least one non-negative weight")
        self.weights = dict(weights)
        self.total = sum(self.weights.values()) or 1.0
        self.start: dict[str, float] = {}
        done = 0.0
        for name, weight in self.weights.items():
            self.start[name] = done
            done += weight

    def fraction(self, phase: str, frac: float) -> float:
        """The overall fraction of `phase` being `frac` done (an unknown phase counts as finished)."""
        if phase not in self.weights:
            return 1.0
        clipped = min(max(frac, 0.0), 1.0)
        return min(1.0, (self.start[phase] + self.weights[phase] * clipped) / self.total)

    def reporter(self, phase: str, report: FractionFn | None) -> FractionFn:
        """A (fraction, message) callback for one phase that reports the overall fraction."""
        def call(frac: float, message: str = "") -> None:
            if report is not None:
                report(self.fraction(phase, frac), message)
        return call


def stage_phases(stages: Sequence[str], weights: Mapping[str, float] = STAGE_WEIGHTS) -> Phases:
    """The stages of one run or job as phases weighted by `STAGE_WEIGHTS`."""
    return Phases({s: weights.get(s, DEFAULT_WEIGHT) for s in stages})


@contextmanager
def uninterruptible(cancel: CancelFn | None, cancelled: type[Exception], what: str) -> Iterator[None]:
    """A stretch of work that cannot poll `cancel` (loading an LLM: seconds, or minutes for a large
    one). `cancel` is checked right before it and right after it (raising `cancelled`), so that a
    cancel which arrived meanwhile stops the run before its first batch; and a cancel callback that
    offers `blocking(what)`, a context manager (the service's, worker/progress.py), is told that the
    stretch runs, so that a cancel arriving meanwhile need not wait for it."""
    if cancel is not None and cancel():
        raise cancelled(f"cancelled before {what}")
    blocking = getattr(cancel, "blocking", None)
    with blocking(what) if blocking is not None else nullcontext():
        yield
    if cancel is not None and cancel():
        raise cancelled(f"cancelled while {what}")
