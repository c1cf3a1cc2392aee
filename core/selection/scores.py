"""Bringing per-sample scores to a common [0, 1] scale and combining them (DEALRec's overall score).

Pure numpy. Every function refuses non-finite input: a NaN would sort to one end and land in a
stratum of its own."""

from __future__ import annotations

import numpy as np


def _as_finite_1d(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        # A NaN would silently sort to one end and land in a stratum of its own; refuse it instead.
        raise ValueError(f"{name} contains non-finite values")
    return arr


def minmax(x: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1]; a constant (or empty) vector maps to zeros rather than NaN."""
    arr = _as_finite_1d(x, "scores")
    if arr.size == 0:
        return arr.copy()
    lo, hi = arr.min(), arr.max()
    with np.errstate(over="ignore"):
        span = hi - lo
    # hi - lo overflows to inf for huge opposite-sign values (e.g. +-1e308); dividing by it would give
    # zeros and NaN, so scale into [-1, 1] first (min-max is invariant to that).
    if not np.isfinite(span):
        arr = arr / max(abs(lo), abs(hi))
        lo, hi = arr.min(), arr.max()
        span = hi - lo
    if span == 0:
        return np.zeros_like(arr)
    return (arr - lo) / span


def rank_normalize(x: np.ndarray) -> np.ndarray:
    """rank / (N - 1) in [0, 1], ties sharing their average rank: only the order of the scores counts."""
    from scipy.stats import rankdata

    arr = _as_finite_1d(x, "scores")
    if arr.size < 2 or np.ptp(arr) == 0:  # a constant score says nothing: zeros, as min-max gives
        return np.zeros_like(arr)
    return (rankdata(arr, method="average") - 1.0) / (arr.size - 1)


def robust_normalize(x: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """Min-max after clipping to the [lower, upper] percentiles, so that a few extreme values do not
    squeeze every other sample into a narrow band of [0, 1]; the clipped tails sit at 0 and 1."""
    arr = _as_finite_1d(x, "scores")
    if arr.size == 0:
        return arr.copy()
    lo, hi = np.percentile(arr, [lower, upper])
    return minmax(np.clip(arr, lo, hi))


NORMALIZERS = {"minmax": minmax, "rank": rank_normalize, "robust": robust_normalize}


def normalize(x: np.ndarray, how: str = "minmax") -> np.ndarray:
    """One score brought to [0, 1] before scores are combined (`SelectionConfig.normalize`)."""
    try:
        return NORMALIZERS[how](x)
    except KeyError:
        raise ValueError(f"unknown normalisation {how!r}; expected one of {', '.join(NORMALIZERS)}") from None


def overall_score(influence: np.ndarray, effort: np.ndarray, lam: float, how: str = "minmax") -> np.ndarray:
    """DEALRec's overall score: norm(influence) + lam * norm(effort), norm = min-max in the paper."""
    inf_n = normalize(influence, how)
    eff_n = normalize(effort, how)
    if inf_n.shape != eff_n.shape:
        raise ValueError(f"influence and effort differ in length: {inf_n.shape[0]} vs {eff_n.shape[0]}")
    return inf_n + lam * eff_n

