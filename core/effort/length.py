"""Pool-level corrections of the raw effort scores (`EffortConfig.length_correction`).

The reference's effort is the norm of the gradient of a token-averaged loss over the whole prompt. On
Games with SmolLM2 it falls steeply with the prompt's length (Spearman about -0.65 with the history
length on 1,000 users): a long prompt averages its gradient over many easy, repetitive tokens (titles
the model has just read), so "hard for the LLM" mostly means "short". `residual` keeps what the score
says beyond length: log(effort) minus its least-squares fit on log(prompt tokens) over the pool.

The fit is a cubic polynomial in centred log(tokens): the relation is not quite a straight line in
log-log space (the fixed instruction dominates short prompts). Measured on the first 10,000 Games
users with SmolLM2: the raw effort's Spearman correlation with prompt tokens is -0.63; after a
straight-line residual +0.07, after the cubic one +0.008 (quadratic: +0.010). The correction is
applied to the cached raw scores, so it is exact whatever computed them, and it uses only the pool
it is given.
"""

from __future__ import annotations

import numpy as np

RESIDUAL_DEGREE = 3


def length_residual(effort: np.ndarray, tokens: np.ndarray, degree: int = RESIDUAL_DEGREE) -> np.ndarray:
    """log(effort) minus its least-squares polynomial fit (of `degree`) on log(tokens).

    Effort norms are positive; a zero (a sample without any loss term) is floored at the smallest
    positive score before the log. With fewer distinct lengths than the degree needs, the degree is
    lowered (at one length, the residual is log(effort) minus its mean)."""
    e = np.asarray(effort, dtype=np.float64)
    t = np.asarray(tokens, dtype=np.float64)
    if e.shape != t.shape or e.ndim != 1:
        raise ValueError(f"effort {e.shape} and prompt tokens {t.shape} must be 1-D of equal length")
    if e.size == 0:
        return e.copy()
    if not (np.all(np.isfinite(e)) and np.all(e >= 0)):
        raise ValueError("effort scores must be finite and non-negative")
    if np.any(t < 1):
        raise ValueError("prompt token counts must be at least 1")
    positive = e[e > 0]
    floor = positive.min() if positive.size else 1.0
    y = np.log(np.maximum(e, floor))
    x = np.log(t)
    x = x - x.mean()
    deg = min(degree, np.unique(x).size - 1)
    if deg < 1:
        return y - y.mean()
    # Scaling x to unit spread keeps the Vandermonde matrix well conditioned.
    scale = x.std() or 1.0
    design = np.vander(x / scale, deg + 1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return y - design @ coef


def correct_effort(effort: np.ndarray, tokens: np.ndarray | None, correction: str) -> np.ndarray:
    """The effort score the selection uses, from the raw per-sample norms."""
    if correction == "none":
        return np.asarray(effort, dtype=np.float64)
    if correction == "residual":
        if tokens is None:
            raise ValueError("the residual length correction needs each sample's prompt token count")
        return length_residual(effort, tokens)
    raise ValueError(f"unknown effort length correction {correction!r}; expected 'none' or 'residual'")
