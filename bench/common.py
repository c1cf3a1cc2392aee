"""Helpers shared by the quality bench's surrogate-level (quality.py) and LLM-level (llm_level.py)
reports: statistics over seeds, number formatting, the command line, matplotlib."""

from __future__ import annotations

import argparse
import logging
import shlex
from collections.abc import Iterable

import numpy as np

log = logging.getLogger("bench.quality")

METRICS = ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50")
SHORT = {m: ("R@" if m.startswith("recall") else "N@") + m.split("@")[1] for m in METRICS}


def mean_std(values: Iterable[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single seed)."""
    arr = np.asarray(list(values), dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": int(arr.size)}


def fmt_mean_std(ms: dict[str, float]) -> str:
    return f"{ms['mean']:.4f} ± {ms['std']:.4f}"


def command_line(args: argparse.Namespace) -> str:
    return "python bench/quality.py " + shlex.join(args.argv)


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), or None when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
