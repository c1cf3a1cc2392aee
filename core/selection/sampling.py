"""Turning one ranking score into a subset: hard pruning, equal-width strata and the paper's
coverage-enhanced sampling (Lin et al., SIGIR 2024, "Coverage-enhanced sample selection"):

    -> drop the highest-scoring floor(hard_prune * N) samples
    -> split the remaining score range into k equal-width strata
    -> coverage-enhanced sampling: smallest stratum first, each gets min(size, floor(m / strata_left)).

All randomness comes from the generator the caller passes (one ``np.random.default_rng(seed)`` per
selection), never from Python's global ``random`` (the reference's unseeded ``random.sample`` is one
of the reasons its selections are not reproducible)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from core.selection.scores import _as_finite_1d

logger = logging.getLogger("core.selection")


@dataclass(frozen=True)
class SelectionResult:
    """Outcome of one selection; every per-sample array has length N (the number of training samples).

    selected: sample indices in selection order (stratum by stratum as visited, draw order inside one;
              descending score for top-k methods; draw order for random).
    overall:  the score the method ranked / stratified by (NaN everywhere for random).
    stratum:  stratum id per sample, -1 when hard-pruned or when the method does not stratify.
    pruned:   True for hard-pruned samples.
    notes:    human-readable remarks for the caller (budget not met, budget larger than N, ...).
    """

    selected: np.ndarray
    overall: np.ndarray
    stratum: np.ndarray
    pruned: np.ndarray
    notes: list[str] = field(default_factory=list)



def _descending_order(scores: np.ndarray) -> np.ndarray:
    """Indices by score descending, ties by index ascending (stable sort on the negated scores)."""
    return np.argsort(-scores, kind="stable")


def hard_prune(scores: np.ndarray, ratio: float) -> np.ndarray:
    """Indices kept after dropping the floor(ratio * N) highest-scoring samples.

    Kept indices come back in descending-score order (ties: lower index first). The count uses
    ``math.floor(ratio * N)`` on the float product exactly like the reference, so the same number of
    samples is pruned (e.g. 0.29 * 100 = 28.999... prunes 28, not 29).
    """
    arr = _as_finite_1d(scores, "scores")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"hard-prune ratio must be in [0, 1), got {ratio}")
    n_drop = math.floor(ratio * arr.size)
    return _descending_order(arr)[n_drop:]


def assign_strata(scores_of_kept: np.ndarray, k: int) -> np.ndarray:
    """Stratum id (0..k-1) per score: k equal-width bins over [min, max] of the given scores.

    Matches the reference's rule "first j with s <= min + interval * (j + 1)", so a value exactly on
    an interior edge goes to the lower bin. searchsorted(side="left") is that rule vectorised: it
    returns the first edge >= s. The last edge is pinned to the max itself because in floating point
    ``min + interval * k`` can land just below max, which in the reference leaves the max sample in
    no stratum at all (silently dropped). All-equal scores: every edge equals the min -> bin 0.
    """
    arr = _as_finite_1d(scores_of_kept, "scores_of_kept")
    if k < 1:
        raise ValueError(f"number of strata must be >= 1, got {k}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = arr.min(), arr.max()
    interval = (hi - lo) / k
    # Edges are monotone non-decreasing (float + and * are monotone), as searchsorted requires.
    edges = np.minimum(lo + interval * np.arange(1, k + 1, dtype=np.float64), hi)
    edges[-1] = hi
    return np.searchsorted(edges, arr, side="left").astype(np.int64)


def coverage_sampling(
    indices: np.ndarray, strata: np.ndarray, budget: int, rng: np.random.Generator
) -> np.ndarray:
    """The paper's coverage-enhanced sampling; returns exactly min(budget, len(indices)) unique indices.

    indices[i] is a sample id and strata[i] its stratum. Empty strata never appear (they have no
    entries). Strata are visited by (size, id) ascending -- sizes never change, so "take the smallest
    remaining stratum" each round is the same as one sort up front -- and each draws
    min(size, floor(m / strata_left)) of its members uniformly without replacement, m being the budget
    still unspent. Result order: stratum by stratum in visit order, draw order within a stratum.
    """
    idx = np.asarray(indices)
    st = np.asarray(strata)
    if idx.ndim != 1 or st.shape != idx.shape:
        raise ValueError(f"indices and strata must be 1-D of equal length, got {idx.shape} and {st.shape}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if np.unique(idx).size != idx.size:
        raise ValueError("indices must be unique")

    # Asking for more than there is: the loop then hands every stratum its full size.
    target = min(budget, idx.size)
    ids, counts = np.unique(st, return_counts=True)
    visit = np.lexsort((ids, counts))  # primary key: size; ties: lowest stratum id

    chunks: list[np.ndarray] = []
    remaining = target
    for pos, j in enumerate(visit):
        strata_left = visit.size - pos
        take = min(int(counts[j]), remaining // strata_left)
        if take:
            chunks.append(rng.choice(idx[st == ids[j]], size=take, replace=False))
        remaining -= take
    selected = np.concatenate(chunks) if chunks else idx[:0].copy()

    # Can the floor leave budget unspent? Not with smallest-first order: by induction
    # m_i <= (sizes of the strata not yet visited). If stratum i gives all s_i, that is immediate; if it
    # gives q = floor(m_i / r) < s_i, write m_i = q r + t (t < r): m_{i+1} = q (r - 1) + t
    # <= (s_i - 1)(r - 1) + (r - 1) = s_i (r - 1) <= sizes of the r - 1 later strata (each >= s_i).
    # So the last stratum, given floor(m / 1) = m, always holds at least m. The top-up below is a guard
    # against a future change of the visit order, not a path the current loop takes.
    if remaining:
        logger.warning("coverage sampling fell %d short of %d; topping up uniformly", remaining, target)
        selected = np.concatenate([selected, _top_up(idx, selected, remaining, rng)])
    return selected


def _top_up(pool: np.ndarray, selected: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n more samples from pool \\ selected, uniformly without replacement.

    Uniform over the leftover samples (rather than e.g. the highest scores) so the top-up adds no
    preference of its own on top of the strata; the same rng keeps the whole selection reproducible.
    """
    rest = pool[~np.isin(pool, selected)]
    return rng.choice(rest, size=min(n, rest.size), replace=False)

