"""The registry of selection methods: for each, the per-sample scores it needs, how they combine into
one ranking score, and how that score becomes a subset. Everything else (the CLI's choices, the REST
API's schema, the bench's list, the stages a pipeline or a job runs) reads this registry, so adding a
method is one `register_method` call here (the shape of peft's `register_peft_method`: a name, its
settings and its implementation in one place).

A method may also set configuration defaults (`defaults`, e.g. a named variant of DEALRec with its
corrections switched on); `core.params.resolve` applies them beneath whatever the caller sets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from core.config import SelectionConfig
from core.selection.sampling import SelectionResult, _descending_order, assign_strata, coverage_sampling, hard_prune
from core.selection.scores import _as_finite_1d, normalize, overall_score

logger = logging.getLogger("core.selection")

Sampling = Literal["stratified", "top_k", "uniform"]
RankScore = Callable[[Mapping[str, np.ndarray], SelectionConfig], np.ndarray]
# The per-sample scores a method can ask for, and the stage that computes each.
SCORE_STAGE = {"influence": "influence", "grand": "influence", "el2n": "influence", "effort": "effort"}


@dataclass(frozen=True)
class Method:
    """One selection method.

    needs:    the per-sample scores it consumes (only those are computed: the effort score needs the
              LLM and is by far the most expensive one);
    sampling: "stratified" (hard prune, equal-width strata, coverage-enhanced sampling), "top_k"
              (the highest `rank_score`s) or "uniform" (a seeded uniform draw, no score);
    rank_score: the scores combined into the one score it ranks or stratifies by;
    defaults: configuration sections it sets unless the caller does ({"effort": {...}, "selection": {...}}).
    """

    name: str
    summary: str
    needs: frozenset[str]
    sampling: Sampling
    rank_score: RankScore | None = None
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(SCORE_STAGE)
        if unknown:
            raise ValueError(f"method {self.name!r} needs unknown score(s) {sorted(unknown)}")
        if (self.rank_score is None) != (self.sampling == "uniform"):
            raise ValueError(f"method {self.name!r}: a rank_score goes with stratified or top-k sampling, only")


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method (a name may be registered once)."""
    if method.name in _REGISTRY:
        raise ValueError(f"selection method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown selection method {name!r}; expected one of {', '.join(_REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order (the paper's baselines first)."""
    return tuple(_REGISTRY)


def required_scores(method: str) -> set[str]:
    """Names of the per-sample scores that ``method`` needs in ``select``'s ``scores``."""
    return set(get_method(method).needs)


# --------------------------------------------------------------------------------------------------
# The built-in methods (the paper's DEALRec, its ablations and the baselines it compares with)
# --------------------------------------------------------------------------------------------------


def _dealrec_score(scores: Mapping[str, np.ndarray], cfg: SelectionConfig) -> np.ndarray:
    return overall_score(scores["influence"], scores["effort"], cfg.lam, cfg.normalize)


def _one(name: str) -> RankScore:
    # Normalised so stratum edges live on the same [0, 1] scale for every stratified method (min-max:
    # equal-width binning is unaffected by an affine map).
    return lambda scores, cfg: normalize(scores[name], cfg.normalize)


def _raw(name: str) -> RankScore:
    return lambda scores, cfg: np.asarray(scores[name], dtype=np.float64).copy()  # ranked as is


register_method(Method("dealrec", "influence + lambda x effort, hard prune, coverage-enhanced strata (the paper)",
                       frozenset({"influence", "effort"}), "stratified", _dealrec_score))
register_method(Method("random", "a seeded uniform draw", frozenset(), "uniform"))
register_method(Method("grand", "the largest per-sample gradient norms on the surrogate's influence weight",
                       frozenset({"grand"}), "top_k", _raw("grand")))
register_method(Method("el2n", "the largest EL2N scores of the surrogate's next-item prediction",
                       frozenset({"el2n"}), "top_k", _raw("el2n")))
register_method(Method("ccs", "EL2N difficulty with DEALRec's hard prune and coverage-enhanced strata",
                       frozenset({"el2n"}), "stratified", _one("el2n")))
register_method(Method("influence", "DEALRec with lambda = 0 (influence only)", frozenset({"influence"}),
                       "stratified", _one("influence")))
register_method(Method("effort", "DEALRec on the effort score alone", frozenset({"effort"}), "stratified",
                       _one("effort")))
register_method(Method("greedy", "the top budget by DEALRec's overall score, no strata",
                       frozenset({"influence", "effort"}), "top_k", _dealrec_score))

# Kept for callers that list the methods as a tuple (tests, older scripts).
METHODS: tuple[str, ...] = method_names()


# --------------------------------------------------------------------------------------------------
# Selecting
# --------------------------------------------------------------------------------------------------


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
    spec = get_method(method)
    arrays, n = _check_scores(method, scores, n_samples)
    rng = np.random.default_rng(cfg.seed)
    budget = cfg.budget
    notes: list[str] = []
    stratum = np.full(n, -1, dtype=np.int64)
    pruned = np.zeros(n, dtype=bool)

    if spec.sampling == "uniform":
        overall = np.full(n, np.nan)
        take = min(budget, n)
        selected = rng.choice(n, size=take, replace=False)
        if budget > n:
            notes.append(f"budget {budget} exceeds the {n} samples: returning all of them")
    elif spec.sampling == "top_k":
        overall = spec.rank_score(arrays, cfg)
        selected = _descending_order(overall)[:budget]
        if budget > n:
            notes.append(f"budget {budget} exceeds the {n} samples: returning all of them")
    else:
        overall = spec.rank_score(arrays, cfg)
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
        overall=_frozen(np.asarray(overall, dtype=np.float64)),
        stratum=_frozen(stratum),
        pruned=_frozen(pruned),
        notes=notes,
    )
