"""What a selection looks like against its pool: the numbers that tell whether a method picks what it
means to, or mostly picks long (or short, or popular) samples.

`selection_diagnostics` is pure: the dataset, the selection, the per-sample scores and each sample's
prompt length in tokens in; a JSON-ready dict out. `dealrec prune` writes it as `diagnostics.json`,
the service links it from the job result, and `bench/quality.py` keeps it per cell.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from core.data.dataset import RecDataset
from core.selection import SelectionResult

FORMAT = "dealrec-diagnostics-v1"
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
# Scores whose link with prompt length is worth a number (those present are reported).
SCORES = ("influence", "effort", "effort_raw", "overall", "grand", "el2n")


def item_popularity(ds: RecDataset) -> np.ndarray:
    """Training interactions per item over the pool (index i - 1 for item i)."""
    counts = np.zeros(ds.n_items, dtype=np.int64)
    for line in ds.train:
        np.add.at(counts, np.asarray(line, dtype=np.int64) - 1, 1)
    return counts


def sample_features(ds: RecDataset, prompt_tokens: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per sample: history length (items before the target), target-item popularity in the pool,
    and prompt tokens when known."""
    popularity = item_popularity(ds)
    lines = ds.train[:ds.n_samples]
    out = {
        "history_length": np.array([len(line) - 1 for line in lines], dtype=np.float64),
        "target_popularity": np.array([popularity[line[-1] - 1] for line in lines], dtype=np.float64),
    }
    if prompt_tokens is not None:
        out["prompt_tokens"] = np.asarray(prompt_tokens, dtype=np.float64)
    return out


def _summary(x: np.ndarray) -> dict[str, float | None]:
    if x.size == 0:
        return {"mean": None, **{f"p{int(q * 100)}": None for q in QUANTILES}}
    return {"mean": round(float(x.mean()), 4),
            **{f"p{int(q * 100)}": round(float(v), 4) for q, v in zip(QUANTILES, np.quantile(x, QUANTILES))}}


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (None when either side is constant or too short)."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    ra, rb = rankdata(a), rankdata(b)
    return round(float(np.corrcoef(ra, rb)[0, 1]), 4)


def strata_fill(result: SelectionResult) -> list[dict[str, int | bool]]:
    """Per stratum: its size after the hard prune, how many samples it gave, and whether it gave all."""
    chosen = np.zeros(result.stratum.size, dtype=bool)
    chosen[np.asarray(result.selected, dtype=np.int64)] = True
    rows = []
    for s in np.unique(result.stratum[result.stratum >= 0]):
        members = result.stratum == s
        size, taken = int(members.sum()), int((members & chosen).sum())
        rows.append({"stratum": int(s), "size": size, "taken": taken, "whole": taken == size})
    return rows


def selection_diagnostics(ds: RecDataset, result: SelectionResult, scores: Mapping[str, np.ndarray],
                          prompt_tokens: np.ndarray | None = None) -> dict:
    """Selected against all on history length, prompt tokens and target popularity (quantiles and
    means), how the strata were filled, the share of the budget from strata taken whole, and the
    Spearman correlation of each score with prompt tokens and history length."""
    features = sample_features(ds, prompt_tokens)
    selected = np.asarray(result.selected, dtype=np.int64)
    doc: dict = {"format": FORMAT, "n_samples": ds.n_samples, "n_selected": int(selected.size),
                 "n_hard_pruned": int(np.asarray(result.pruned).sum()), "features": {}}
    for name, values in features.items():
        doc["features"][name] = {"all": _summary(values), "selected": _summary(values[selected]),
                                 "pruned": _summary(values[np.asarray(result.pruned, dtype=bool)])}
    strata = strata_fill(result)
    whole = sum(r["taken"] for r in strata if r["whole"] and r["taken"])
    doc["strata"] = {"count": len(strata), "rows": strata, "taken_whole": sum(1 for r in strata if r["whole"]),
                     "budget_share_from_whole_strata": round(whole / selected.size, 4) if selected.size else 0.0}
    present = {name: np.asarray(scores[name], dtype=np.float64) for name in SCORES
               if name in scores and scores[name] is not None}
    if "overall" not in present and np.isfinite(result.overall).any():
        present["overall"] = np.asarray(result.overall, dtype=np.float64)
    doc["spearman"] = {
        name: {feature: spearman(values, features[feature]) for feature in ("prompt_tokens", "history_length")
               if feature in features}
        for name, values in present.items()}
    if "influence" in present and "effort" in present:
        doc["spearman"]["influence_vs_effort"] = spearman(present["influence"], present["effort"])
    return doc


def summary_lines(doc: dict) -> list[str]:
    """A few lines for a terminal: what the selection holds against the pool."""
    lines = []
    for name, label in (("history_length", "history items"), ("prompt_tokens", "prompt tokens"),
                        ("target_popularity", "target popularity")):
        f = doc["features"].get(name)
        if f:
            lines.append(f"{label}: selected mean {f['selected']['mean']:.1f} (median {f['selected']['p50']:.0f}), "
                         f"all {f['all']['mean']:.1f} (median {f['all']['p50']:.0f})")
    st = doc["strata"]
    if st["count"]:
        lines.append(f"strata: {st['count']}, {st['taken_whole']} taken whole, giving "
                     f"{100 * st['budget_share_from_whole_strata']:.1f}% of the selection")
    corr = [f"{name} {c['prompt_tokens']:+.2f}" for name, c in doc["spearman"].items()
            if isinstance(c, dict) and c.get("prompt_tokens") is not None]
    if corr:
        lines.append("Spearman with prompt tokens: " + ", ".join(corr))
    return lines
