"""Stage 4 of DEALRec: turn per-sample scores into a selected subset, plus the paper's baselines.

DEALRec (Lin et al., SIGIR 2024, section "Coverage-enhanced sample selection"):
    overall = minmax(influence) + lambda * minmax(effort)
    -> drop the highest-scoring floor(hard_prune * N) samples
    -> split the remaining score range into k equal-width strata
    -> coverage-enhanced sampling: smallest stratum first, each gets min(size, floor(m / strata_left)).

The package, in the order a reader needs it:
- `scores`: bringing each score to [0, 1] (min-max, rank, robust) and DEALRec's overall score;
- `sampling`: hard prune, equal-width strata, coverage-enhanced sampling, `SelectionResult`;
- `methods`: the registry of methods (what each needs, how it ranks and samples) and `select`.

Everything here is pure numpy and deterministic given the seed: all randomness comes from one
``np.random.default_rng(seed)`` created per ``select`` call, never from Python's global ``random``
(the reference's unseeded ``random.sample`` is one of the reasons its selections are not reproducible).
"""

from core.selection.methods import (
    METHODS,
    SCORE_STAGE,
    Method,
    get_method,
    method_names,
    register_method,
    required_scores,
    select,
)
from core.selection.sampling import SelectionResult, _top_up, assign_strata, coverage_sampling, hard_prune
from core.selection.scores import NORMALIZERS, minmax, normalize, overall_score, rank_normalize, robust_normalize

__all__ = [
    "METHODS", "NORMALIZERS", "SCORE_STAGE", "Method", "SelectionResult", "_top_up", "assign_strata",
    "coverage_sampling", "get_method", "hard_prune", "method_names", "minmax", "normalize", "overall_score",
    "rank_normalize", "register_method", "required_scores", "robust_normalize", "select",
]
