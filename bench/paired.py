"""Paired statistics for the LLM-level comparison: one method against a reference on the same test
users, over one or several seeds, and the decision rule of docs/RESULTS.md built on them.

The unit is the test user: a user's difference is averaged over the seeds (the seeds of one user are
not independent), then
- the 95% interval resamples users (percentile bootstrap),
- the one-sided p-values come from a paired sign-flip test: under "no difference" each user's
  difference is as likely positive as negative, so flipping signs at random draws the null
  distribution of the mean. Unlike the share of bootstrap resamples on the wrong side of zero (a
  distribution centred on the observed difference, not on the null), it is a test, and (k + 1) /
  (B + 1) never reports an impossible p of 0.
Both treat the seeds' fine-tuning runs as given: `per_seed` shows how far the runs move the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SAMPLES = 10_000
ALPHA = 0.05
Z_ONE_SIDED_95, Z_POWER_80 = 1.6449, 0.8416  # standard normal quantiles 0.95 and 0.80
_CHUNK = 1_000  # resamples drawn at once: 1,330 users x 1,000 stays ~10 MB


def paired_test(a: np.ndarray, b: np.ndarray, seed: int = 0, samples: int = SAMPLES,
                lower_is_better: bool = False) -> dict[str, Any]:
    """`a` against `b`, both (users,) or (seeds, users) over the same users; NaN marks a user without
    a value (e.g. no rank): only users with a value on both sides in every seed are compared.

    Returns "diff" (mean of a - b), "ci95" (percentile interval, users resampled), "p" (one-sided
    sign-flip p for "a is better": larger, or smaller with `lower_is_better`), "p_worse" (the same for
    "a is worse"), "mde80" (the smallest true difference these users would show at p < 0.05 one-sided
    four times in five: (z 0.95 + z 0.80) * sd / sqrt(users)), "users" (compared) and "per_seed" (the
    mean difference in each seed)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired samples need the same non-zero number of users")
    diff = np.atleast_2d(a - b)
    keep = np.isfinite(diff).all(axis=0)
    if not keep.any():
        raise ValueError("no user has a value on both sides")
    diff = diff[:, keep]
    per_user = diff.mean(axis=0)
    n = per_user.size
    observed = float(per_user.mean())
    rng = np.random.default_rng(seed)
    boot, flipped = [], []
    for start in range(0, samples, _CHUNK):
        k = min(_CHUNK, samples - start)
        boot.append(per_user[rng.integers(0, n, size=(k, n))].mean(axis=1))
        flipped.append((rng.choice(np.array([-1.0, 1.0]), size=(k, n)) * per_user).mean(axis=1))
    boot_means, null = np.concatenate(boot), np.concatenate(flipped)
    lo, hi = np.percentile(boot_means, [2.5, 97.5])
    # Ties with the observed mean count against the claim (a zero difference is never "better").
    tol = 1e-12 * max(1.0, abs(observed))
    larger = int((null >= observed - tol).sum())
    smaller = int((null <= observed + tol).sum())
    p_larger, p_smaller = (larger + 1) / (samples + 1), (smaller + 1) / (samples + 1)
    spread = float(per_user.std(ddof=1)) if n > 1 else 0.0
    return {"diff": observed, "ci95": [float(lo), float(hi)],
            "p": p_smaller if lower_is_better else p_larger,
            "p_worse": p_larger if lower_is_better else p_smaller,
            "mde80": (Z_ONE_SIDED_95 + Z_POWER_80) * spread / float(np.sqrt(n)),
            "users": n, "per_seed": [float(d.mean()) for d in diff]}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order): a family of tests at level alpha holds its
    chance of any false "better" at alpha."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def decide(pooled: Sequence[dict[str, Any]], deciding: Sequence[str], guard: str | None) -> list[dict[str, Any]]:
    """The decision rule over the pooled rows (one per method against the reference): a method beats the
    reference where its one-sided p is below ALPHA on any `deciding` metric (higher is better: Recall,
    NDCG) and it is not worse on
    `guard` (its one-sided p for "worse" is not below ALPHA). "holm" repeats the rule with the p-values
    adjusted over every method x deciding metric of the report (the family a reader scans)."""
    rows = [c for c in pooled if all(m in c for m in deciding)]
    family = [c[m]["p"] for c in rows for m in deciding]
    adjusted = iter(holm(family))
    out = []
    for c in rows:
        p = {m: c[m]["p"] for m in deciding}
        p_holm = {m: next(adjusted) for m in deciding}
        guard_ok = None if guard is None or guard not in c else c[guard]["p_worse"] >= ALPHA
        best = min(deciding, key=lambda m: p[m])
        per_seed = c[best]["per_seed"]
        out.append({"method": c["a"], "reference": c["b"], "p": p, "p_holm": p_holm,
                    "guard": guard, "guard_ok": guard_ok,
                    "beats": bool(min(p.values()) < ALPHA and guard_ok is not False),
                    "beats_holm": bool(min(p_holm.values()) < ALPHA and guard_ok is not False),
                    "best_metric": best, "per_seed": per_seed,
                    "seeds_agree": all(d > 0 for d in per_seed) if len(per_seed) > 1 else None})
    return out
