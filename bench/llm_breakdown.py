"""Where an LLM-level difference comes from: each method's per-user difference to a reference method
(same test users, same seeds), broken down by quartiles of what describes a test user.

    python bench/llm_breakdown.py --data ../shared/datasets/games --limit-users 10000 \
        --out bench/results/quality-10000 --methods dealrec,ccs --reference random --budget 1024

Reads only committed files: the finished cells under OUT/llm-cells/ (every seed that the reference
and the method both have, on the same users) and the dataset for the users' features. Per user the
difference is averaged over those seeds, then grouped by quartile of
- history: the test user's history length (training and validation items: what the prompt holds),
- answer tokens: the true title's length in tokens (NLL is a mean over them),
- target popularity: how often the true test item is a training item of the pool's users.
Writes OUT/llm-breakdown.md and .json. Metrics: NLL (lower is better) and, where the cells have
them, the rank percentile and Recall/NDCG@20.

It ends with one row per finished cell (every method and seed of the budget): the fine-tuning's
training tokens (mean prompt tokens of the selection, the loss covering the whole prompt) against its
mean NLL, and their rank correlation over the cells: how much of a selection's NLL is how many tokens
it gave the model to learn from.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.llm_level import DENSE, LLM_CELL_FORMAT, NLL, RANK, has_metric, per_user  # noqa: E402
from core.data import load_dataset  # noqa: E402

log = logging.getLogger("bench.llm_breakdown")
METRICS = (NLL, RANK, "recall@20", "ndcg@20")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit-users", type=int, default=None)
    ap.add_argument("--out", required=True, help="a quality bench output folder (its llm-cells/)")
    ap.add_argument("--methods", default="dealrec,ccs")
    ap.add_argument("--reference", default="random")
    ap.add_argument("--budget", type=int, default=1024)
    return ap.parse_args(argv)


def finished_cells(out: Path, budget: int, n_users: int | None = None) -> dict[tuple[str, int], dict[str, Any]]:
    """(method, seed) -> cell, for the cells of `budget` with an NLL for every user (when several
    evaluations of one (method, seed) exist, the one over the most users, and of those one with
    generation metrics rather than an NLL screen)."""
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for path in sorted((out / "llm-cells").glob(f"*-b{budget}-*.json")):
        cell = json.loads(path.read_text())
        if cell.get("format") != LLM_CELL_FORMAT or not has_metric(cell, NLL):
            continue
        key = (cell["method"], cell["seed"])
        if key not in found or _fuller(cell) > _fuller(found[key]):
            found[key] = cell
    return found


def token_table(cells: dict[tuple[str, int], dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each fine-tuned cell's mean training prompt tokens and mean NLL, fewest tokens first, and the
    Spearman correlation of the two over the cells (markdown lines)."""
    from scipy.stats import spearmanr

    rows = sorted(({"method": m, "seed": s, "train_tokens": float(c["finetune"]["mean_train_tokens"]),
                    "nll": float(np.mean(per_user(c, NLL)))}
                   for (m, s), c in cells.items() if c.get("finetune")), key=lambda r: (r["train_tokens"], r["method"]))
    if len(rows) < 3:
        return rows, []
    rho = float(spearmanr([r["train_tokens"] for r in rows], [r["nll"] for r in rows]).statistic)
    lines = ["## Training tokens against NLL, every finished cell", "",
             f"Spearman correlation over the {len(rows)} cells: {rho:+.2f} (fine-tuning covers the whole prompt, "
             "so a selection of longer histories gives the model more title tokens to learn from).", "",
             "| method | seed | mean prompt tokens of the selection | NLL |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['method']} | {r['seed']} | {r['train_tokens']:.1f} | {r['nll']:.4f} |" for r in rows]
    return rows, lines + [""]


def _fuller(cell: dict[str, Any]) -> tuple[int, bool]:
    return len(cell["users"]), has_metric(cell, "recall@20")


def user_features(ds, users: list[int]) -> dict[str, np.ndarray]:
    popularity = Counter(i for seq in ds.train for i in seq)
    return {"history": np.array([len(ds.train[u]) + len(ds.valid[u]) for u in users], dtype=float),
            "target popularity": np.array([popularity.get(ds.test[u][0], 0) for u in users], dtype=float)}


def quartiles(x: np.ndarray) -> list[np.ndarray]:
    """Four groups of users by rank (ties broken by position), so every group holds a quarter even
    where a feature has many equal values (popularity 0)."""
    order = np.argsort(x, kind="stable")
    return [np.sort(part) for part in np.array_split(order, 4)]


def breakdown(diff: np.ndarray, features: dict[str, np.ndarray]) -> dict[str, list[dict[str, float]]]:
    out = {}
    for name, x in features.items():
        out[name] = [{"from": float(x[g].min()), "to": float(x[g].max()), "users": int(g.size),
                      "mean_diff": float(diff[g].mean())} for g in quartiles(x)]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    ds = load_dataset(args.data, limit_users=args.limit_users)
    cells = finished_cells(out, args.budget)
    report: dict[str, Any] = {"reference": args.reference, "budget": args.budget, "methods": {}}
    lines = [f"# Where the LLM-level differences come from (budget {args.budget}, against {args.reference})", "",
             f"`python bench/llm_breakdown.py --data {args.data} --limit-users {args.limit_users} --out {args.out} "
             f"--methods {args.methods} --reference {args.reference} --budget {args.budget}`", "",
             "Each cell: the mean over the quartile's test users of (method - reference), per user averaged over "
             "the seeds both have. NLL and Rank % (the true item's place in the whole ranking, % of the items): lower "
             "is better (a negative difference favours the method).", ""]
    for method in args.methods.split(","):
        seeds = sorted(s for (m, s) in cells if m == method and (args.reference, s) in cells)
        if not seeds:
            log.warning("%s: no seed with both it and %s finished", method, args.reference)
            continue
        pairs = [(cells[(method, s)], cells[(args.reference, s)]) for s in seeds]
        users = [u["user"] for u in pairs[0][0]["users"]]
        if any([u["user"] for c in pair for u in c["users"]] != users * 2 for pair in pairs):
            raise SystemExit(f"llm_breakdown: {method} and {args.reference} cells differ in their test users")
        features = user_features(ds, users)
        features["answer tokens"] = np.array([u["answer_tokens"] for u in pairs[0][0]["users"]], dtype=float)
        entry: dict[str, Any] = {"seeds": seeds, "users": len(users)}
        for metric in METRICS:
            if not all(has_metric(c, metric) for pair in pairs for c in pair):
                continue
            diff = np.mean([per_user(a, metric) - per_user(b, metric) for a, b in pairs], axis=0)
            entry[metric] = {"mean_diff": float(diff.mean()), "share_method_better":
                             float(np.mean(diff < 0 if metric in DENSE else diff > 0)),
                             "by": breakdown(diff, features)}
            lines += [f"## {method} - {args.reference}, {metric}, seeds {', '.join(map(str, seeds))}, "
                      f"{len(users)} test users", "",
                      f"Mean difference {diff.mean():+.4f}; the method is better for "
                      f"{100 * entry[metric]['share_method_better']:.1f} % of the users.", "",
                      "| by | quartile 1 | quartile 2 | quartile 3 | quartile 4 |", "| --- | --- | --- | --- | --- |"]
            for name, groups in entry[metric]["by"].items():
                cells_md = [f"{g['mean_diff']:+.4f} ({g['from']:g}-{g['to']:g})" for g in groups]
                lines.append(f"| {name} | " + " | ".join(cells_md) + " |")
            lines.append("")
        report["methods"][method] = entry
    rows, table = token_table(cells)
    report["cells_by_tokens"] = rows
    lines += table
    (out / "llm-breakdown.md").write_text("\n".join(lines))
    (out / "llm-breakdown.json").write_text(json.dumps(report, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
