"""Stage 4 of DEALRec: turn per-sample scores into a selected subset, plus the paper's baselines.

DEALRec (Lin et al., SIGIR 2024, section "Coverage-enhanced sample selection"):
    overall = minmax(influence) + lambda * minmax(effort)
    -> drop the highest-scoring floor(hard_prune * N) samples
    -> split the remaining score range into k equal-width strata
    -> coverage-enhanced sampling: smallest stratum first, each gets min(size, floor(m / strata_left)).

Everything here is pure numpy and deterministic given the seed: all randomness comes from one
``np.random.default_rng(seed)`` created per ``select`` call, never from Python's global ``random``
(the reference's unseeded ``random.sample`` is one of the reasons its selections are not reproducible).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from core.config import SelectionConfig

logger = logging.getLogger(__name__)

# Which per-sample scores each method consumes, so the pipeline computes nothing else
# (the effort score needs the LLM and is by far the most expensive one).
_REQUIRED: dict[str, frozenset[str]] = {
    "dealrec": frozenset({"influence", "effort"}),
    "influence": frozenset({"influence"}),
    "effort": frozenset({"effort"}),
    "ccs": frozenset({"el2n"}),
    "greedy": frozenset({"influence", "effort"}),
    "grand": frozenset({"grand"}),
    "el2n": frozenset({"el2n"}),
    "random": frozenset(),
}
METHODS: tuple[str, ...] = tuple(_REQUIRED)

# Methods that go through hard prune + strata + coverage sampling; the others are top-k or uniform.
_STRATIFIED = frozenset({"dealrec", "influence", "effort", "ccs"})
_TOP_K = frozenset({"greedy", "grand", "el2n"})


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


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------


def required_scores(method: str) -> set[str]:
    """Names of the per-sample scores that ``method`` needs in ``select``'s ``scores``."""
    try:
        return set(_REQUIRED[method])
    except KeyError:
        raise ValueError(f"unknown selection method {method!r}; expected one of {', '.join(METHODS)}") from None


def _check_scores(
    method: str, scores: Mapping[str, np.ndarray], n_samples: int | None
) -> tuple[dict[str, np.ndarray], int]:
    """Validate what `method` needs and settle N (from the scores, or n_samples when none is given)."""
    missing = sorted(required_scores(method) - set(scores))
    if missing:
        raise ValueError(f"method {method!r} needs score(s) {', '.join(missing)}, which were not provided")
    # Every given vector is per sample of the same training set, so any length mismatch is a bug upstream.
    arrays = {name: _as_finite_1d(vec, name) for name, vec in scores.items()}
    lengths = {name: a.size for name, a in arrays.items()}
    if n_samples is not None:
        lengths["n_samples"] = n_samples
    if len(set(lengths.values())) > 1:
        raise ValueError(f"score lengths disagree: {lengths}")
    if not lengths:
        raise ValueError(f"method {method!r} needs n_samples when no scores are given")
    n = next(iter(lengths.values()))
    if n < 0:
        raise ValueError(f"n_samples must be >= 0, got {n}")
    return arrays, n


def _method_score(method: str, arrays: dict[str, np.ndarray], lam: float, how: str = "minmax") -> np.ndarray:
    if method in ("dealrec", "greedy"):
        return overall_score(arrays["influence"], arrays["effort"], lam, how)
    if method == "influence":
        return normalize(arrays["influence"], how)  # lambda = 0: effort plays no part
    if method == "effort":
        return normalize(arrays["effort"], how)
    if method == "ccs":
        # EL2N as the difficulty score; normalised so stratum edges live on the same [0, 1] scale as the
        # other stratified methods (min-max: equal-width binning is unaffected by an affine map).
        return normalize(arrays["el2n"], how)
    return arrays[method].copy()  # grand, el2n: the raw score, ranked as is


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def select(
    method: str,
    scores: Mapping[str, np.ndarray],
    cfg: SelectionConfig,
    *,
    n_samples: int | None = None,
) -> SelectionResult:
    """Select cfg.budget sample indices with `method` (which overrides cfg.method, so one config can
    drive several baselines). `scores` maps score names to length-N vectors; only
    ``required_scores(method)`` must be present. `n_samples` gives N when no score is passed (random).

    Stratified methods return exactly cfg.budget samples whenever at least that many survive the hard
    prune; otherwise all survivors, with a note (the caller decides how loudly to warn).
    """
    arrays, n = _check_scores(method, scores, n_samples)
    rng = np.random.default_rng(cfg.seed)
    budget = cfg.budget
    notes: list[str] = []
    stratum = np.full(n, -1, dtype=np.int64)
    pruned = np.zeros(n, dtype=bool)

    if method == "random":
        overall = np.full(n, np.nan)
        take = min(budget, n)
        selected = rng.choice(n, size=take, replace=False)
        if budget > n:
            notes.append(f"budget {budget} exceeds the {n} samples: returning all of them")
    elif method in _TOP_K:
        overall = _method_score(method, arrays, cfg.lam, cfg.normalize)
        selected = _descending_order(overall)[:budget]
        if budget > n:
            notes.append(f"budget {budget} exceeds the {n} samples: returning all of them")
    else:
        assert method in _STRATIFIED
        overall = _method_score(method, arrays, cfg.lam, cfg.normalize)
        kept = hard_prune(overall, cfg.hard_prune)
        pruned[:] = True
        pruned[kept] = False
        if n - kept.size:
            notes.append(f"hard-pruned the {n - kept.size} highest-scoring of {n} samples (ratio {cfg.hard_prune})")
        stratum[kept] = assign_strata(overall[kept], cfg.strata)
        selected = coverage_sampling(kept, stratum[kept], budget, rng)
        if budget > kept.size:
            notes.append(
                f"budget {budget} exceeds the {kept.size} samples left after hard pruning "
                f"({n} in all): returning all {kept.size}"
            )

    selected = np.asarray(selected, dtype=np.int64)
    logger.info("selection %s: %d of %d samples (budget %d, seed %d)", method, selected.size, n, budget, cfg.seed)
    return SelectionResult(
        selected=_frozen(selected),
        overall=_frozen(overall),
        stratum=_frozen(stratum),
        pruned=_frozen(pruned),
        notes=notes,
    )
