"""Wall time and peak resident memory of a stage: one small instrument, used by the pipeline, the
CLI's summary, the worker's job record and the benchmarks."""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass


@dataclass
class StageRecord:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0  # this process
    child_peak_rss_mb: float = 0.0  # the largest helper process the stage started (effort on CPU), if any
    cached: bool = False
    skipped: bool = False


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


class StageTimer:
    """Wall time and peak resident memory of one stage. The process-wide peak (ru_maxrss) never goes
    down, so a sampling thread measures the peak within the stage itself."""

    def __init__(self, stages: dict[str, StageRecord], name: str, interval: float = 0.05) -> None:
        self.rec = stages.setdefault(name, StageRecord())
        self.interval = interval

    def __enter__(self) -> StageRecord:
        self._children_before = _children_peak_mb()
        self._stop = threading.Event()
        self._peak = current_rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self.rec

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, current_rss_mb())

    def __exit__(self, *exc) -> None:
        self.rec.seconds += time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.rec.peak_rss_mb = max(self.rec.peak_rss_mb, self._peak, current_rss_mb())
        children = _children_peak_mb()
        if children > self._children_before:  # a child of this stage set a new high
            self.rec.child_peak_rss_mb = max(self.rec.child_peak_rss_mb, children)


def _children_peak_mb() -> float:
    """Peak RSS of the largest terminated child process so far (the OS keeps only the maximum)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
