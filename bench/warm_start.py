"""Warm-started against cold surrogates on a dataset that grew by 10 %: training time and quality.

    python bench/warm_start.py --data ../shared/datasets/games --limit-users 10000 [--extra 1000] [--seeds 3]

For each seed: the surrogate of the first N - extra users (the previous version, cold, from the
cache when there), then two surrogates of the first N users: cold (from scratch, the paper's run)
and warm (started from the previous version's, `dealrec prune --warm-start`). For each, the
surrogate's own test Recall/NDCG@20 over every user, its epochs and training time, and the quality
of the selection it leads to at the surrogate level (--method, default influence-only: the part of
DEALRec the surrogate decides; a SASRec trained on the --budget selected samples, as in
bench/quality.py). Printed: per seed and mean ± std; with --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import mean_std  # noqa: E402

log = logging.getLogger("bench.warm_start")

METRICS = ("recall@20", "ndcg@20")


def run_seed(ds, previous, seed: int, args: argparse.Namespace, cache_dir: Path) -> dict[str, Any]:
    import torch

    from core.evaluate.surrogate import surrogate_level
    from core.params import PruneOverrides, resolve
    from core.pipeline import previous_surrogate, run_prune
    from core.stages.scoring import surrogate_stage

    cfg = resolve(PruneOverrides(method=args.method, budget=args.budget, seed=seed), ds.n_users)
    dev = torch.device("cpu")
    surrogate_stage(previous, cfg, dev, cache_dir)  # the previous version's, cached
    init = previous_surrogate(previous, cfg, cache_dir)
    out: dict[str, Any] = {}
    for name, start in (("cold", None), ("warm", init)):
        t0 = time.perf_counter()
        pruned = run_prune(ds, cfg, device="cpu", cache_dir=cache_dir, surrogate_init=start)
        report = pruned.surrogate_report
        selected = [int(u) for u in pruned.selection.selected]
        quality = surrogate_level(ds, selected, cfg.surrogate, seed, device=dev)
        out[name] = {"surrogate_test": {m: report["test"][m] for m in METRICS},
                     "epochs_run": report["epochs_run"], "best_epoch": report["best_epoch"],
                     "train_seconds": round(report["train_seconds"], 1),
                     "selection": {m: quality["metrics"][m] for m in METRICS} if "metrics" in quality
                     else {m: quality[m] for m in METRICS},
                     "prune_seconds": round(time.perf_counter() - t0, 1)}
        log.info("seed %d %s: surrogate %d epochs in %.0fs, test R@20 %.4f; selection R@20 %.4f", seed, name,
                 report["epochs_run"], report["train_seconds"], report["test"]["recall@20"],
                 out[name]["selection"]["recall@20"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--limit-users", type=int, default=10_000, help="users of the new version (10,000)")
    p.add_argument("--extra", type=int, default=None, help="users the new version adds (10 %% of them)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--method", default="influence", help="selection method whose quality is compared (influence)")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from core.cache import default_cache_dir
    from core.data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    extra = args.extra if args.extra is not None else args.limit_users // 11
    ds = load_dataset(args.data, limit_users=args.limit_users)
    previous = ds.limit_users(args.limit_users - extra)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    t0 = time.perf_counter()
    per_seed = {seed: run_seed(ds, previous, seed, args, cache_dir) for seed in range(args.seeds)}
    summary: dict[str, Any] = {}
    for name in ("cold", "warm"):
        rows = [per_seed[s][name] for s in per_seed]
        summary[name] = {
            "surrogate_test": {m: mean_std(r["surrogate_test"][m] for r in rows) for m in METRICS},
            "selection": {m: mean_std(r["selection"][m] for r in rows) for m in METRICS},
            "epochs_run": mean_std(r["epochs_run"] for r in rows),
            "train_seconds": mean_std(r["train_seconds"] for r in rows)}
    within = {f"{part}.{m}": abs(summary["warm"][part][m]["mean"] - summary["cold"][part][m]["mean"])
              <= summary["cold"][part][m]["std"] for part in ("surrogate_test", "selection") for m in METRICS}
    report = {"users": args.limit_users, "previous_users": args.limit_users - extra, "method": args.method,
              "budget": args.budget, "seeds": args.seeds, "per_seed": per_seed, "summary": summary,
              "warm_within_one_std_of_cold": within,
              "train_time_warm_over_cold": round(summary["warm"]["train_seconds"]["mean"]
                                                 / summary["cold"]["train_seconds"]["mean"], 3),
              "seconds": round(time.perf_counter() - t0, 1)}
    for name in ("cold", "warm"):
        s = summary[name]
        print(f"{name}: surrogate test R@20 {s['surrogate_test']['recall@20']['mean']:.4f} ± "
              f"{s['surrogate_test']['recall@20']['std']:.4f}, N@20 {s['surrogate_test']['ndcg@20']['mean']:.4f}; "
              f"selection R@20 {s['selection']['recall@20']['mean']:.4f} ± {s['selection']['recall@20']['std']:.4f}, "
              f"N@20 {s['selection']['ndcg@20']['mean']:.4f} ± {s['selection']['ndcg@20']['std']:.4f}; "
              f"{s['epochs_run']['mean']:.0f} epochs, {s['train_seconds']['mean']:.0f} s")
    print(f"warm within one std of cold: {within}")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
