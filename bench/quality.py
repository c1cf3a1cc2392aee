"""Surrogate-level quality of every pruning method at the same budget: the paper's comparison table
(Lin et al., SIGIR 2024, Table 2) at the cheap proxy level, plus the quality-vs-ratio curve.

    python bench/quality.py --data ../shared/datasets/games --limit-users 10000 [--seeds 3]
        [--budgets 1024] [--methods random,grand,el2n,ccs,dealrec,influence,effort,greedy] [--no-llm]
        [--ratio-budgets 256,512,1024,2048,4096] [--ratio-methods dealrec,random] [--skip-ratio]
        [--epochs N] [--out DIR] [--json]

For each seed and method: select with the pipeline (core.pipeline.run_prune, the configuration
`dealrec prune` builds for that seed; scores come from core's content-addressed cache, so the
surrogate and influence are computed once per seed and the LLM effort once for all seeds), then
train the surrogate with the same configuration and seed on only the selected samples and measure
its full-ranking test Recall/NDCG@10/20/50 over all users (core.evaluate.surrogate). The full-data
surrogate of each seed is the upper reference line.

Every (method, seed, budget) result is kept as JSON under OUT/cells/: an interrupted run resumes
where it stopped. OUT gets results.md / results.png / results.json and ratio.md / ratio.png. With
--json the last stdout line is {method: {metric: {"mean", "std"}}} for the first budget.

    python bench/quality.py --data ../shared/datasets/games --limit-users 10000 --llm-eval
        [--methods dealrec,random] [--seeds 1] [--llm-epochs 2] [--llm-lr 1e-3] [--test-users 500] [--no-base]

--llm-eval is the LLM-level comparison instead (bench/llm_level.py): LoRA-fine-tune the LLM on each
method's selection (the same cells' selections) and evaluate it BIGRec-style on one fixed subset of
test users, plus the LLM without fine-tuning; OUT gets llm.md / llm.png / llm.json, cells under
OUT/llm-cells/, and --json prints the same shape with the rows "base" and the methods.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import llm_level, variants
from bench.common import METRICS, SHORT, command_line, mean_std
from bench.common import fmt_mean_std as _fmt
from bench.common import pyplot as _pyplot
from core.cache import atomic_write_bytes, cache_key, default_cache_dir
from core.config import PruneConfig, key_dump
from core.data.dataset import RecDataset
from core.selection.methods import method_names

log = logging.getLogger("bench.quality")

# The registry's methods (core/selection/methods.py), the paper's table order first.
PAPER_ORDER = ("random", "grand", "el2n", "ccs", "dealrec", "influence", "effort", "greedy")
METHODS = tuple(sorted(method_names(), key=lambda m: (PAPER_ORDER.index(m) if m in PAPER_ORDER else len(PAPER_ORDER),
                                                      m)))
FULL = "full"  # the full-data reference row
RATIO_METRICS = ("recall@20", "ndcg@20")
LABELS = {FULL: "full data", "random": "Random", "grand": "GraNd", "el2n": "EL2N", "ccs": "CCS",
          "dealrec": "DEALRec", "influence": "influence only", "effort": "effort only", "greedy": "greedy"}
CELL_FORMAT = "dealrec-quality-cell-v1"


# ----------------------------------------------------------------------------------------------
# Command line


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder (any layout `dealrec prune` reads)")
    ap.add_argument("--limit-users", type=int, default=None, help="keep only the first N users")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..S-1 (default 3; 1 with --llm-eval)")
    ap.add_argument("--budgets", default="1024", help="table budget(s): counts or ratios, comma-separated")
    ap.add_argument("--methods", default=None,
                    help="comma-separated pruning methods (default all; dealrec,random with --llm-eval)")
    ap.add_argument("--no-llm", action="store_true", help="skip the methods that need the LLM's effort score")
    ap.add_argument("--ratio-budgets", default="256,512,1024,2048,4096", help="budgets of the ratio curve")
    ap.add_argument("--ratio-methods", default="dealrec,random", help="methods of the ratio curve")
    ap.add_argument("--skip-ratio", action="store_true", help="no ratio curve")
    ap.add_argument("--epochs", type=int, default=None, help="surrogate max epochs, selection and evaluation (200)")
    ap.add_argument("--llm", default="auto", help="effort LLM, as `dealrec prune --llm`")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    ap.add_argument("--cache-dir", default=None, help="core's cache (default $DEALREC_CACHE_DIR or ~/.cache/dealrec)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/quality-<limit-users>)")
    ap.add_argument("--report", default="results",
                    help="name of the report files in OUT (results: results.md/.png/.json; with --llm-eval the "
                         "default is llm or llm-nll); the cells are shared by every report of OUT")
    ap.add_argument("--effort-store", default=None,
                    help="root of the per-sample effort store (default: the cache folder); a folder under OUT "
                         "that is committed lets effort scoring resume in a later session")
    ap.add_argument("--fresh", action="store_true", help="recompute every cell instead of resuming")
    ap.add_argument("--shard", default=None, metavar="I/N",
                    help="run only every N-th cell starting at I (0-based): one process per core, then one run "
                         "without --shard assembles the reports from the cells")
    ap.add_argument("--json", action="store_true", help="last stdout line: method -> metric -> mean/std")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("-v", "--verbose", action="store_true", help="also core's per-epoch log lines")
    llm_level.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.methods is None:
        args.methods = "dealrec,random" if args.llm_eval else ",".join(METHODS)
    if args.seeds is None:
        args.seeds = 1 if args.llm_eval else 3
    args.methods = _checked_methods(_csv(args.methods), "--methods")
    args.ratio_methods = _checked_methods(_csv(args.ratio_methods), "--ratio-methods")
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    args.skipped = []  # methods --no-llm dropped, logged once logging is set up
    if args.no_llm:
        args.skipped = [m for m in args.methods + args.ratio_methods if _needs_llm(m)]
        args.methods = [m for m in args.methods if not _needs_llm(m)]
        args.ratio_methods = [m for m in args.ratio_methods if not _needs_llm(m)]
    if not args.methods:
        ap.error("no method left to compare")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _checked_methods(names: list[str], flag: str) -> list[str]:
    for name in names:
        try:
            variants.parse(name, METHODS)
        except variants.VariantError as exc:
            raise SystemExit(f"quality: error: {flag}: {exc}") from None
    return list(dict.fromkeys(names))


def _needs_llm(method: str) -> bool:
    from core.selection import required_scores

    ref = variants.matched_reference(method)
    return "effort" in required_scores(variants.base_method(ref or method))


def label(method: str) -> str:
    """The row name of a method or variant spec (bench/variants.py)."""
    return variants.label(method, LABELS)


def parse_budgets(text: str, n_samples: int) -> list[int]:
    """Counts (`1024`) or ratios of the samples (`0.02`), as `dealrec prune --budget` reads them."""
    from core.params import parse_budget

    budgets = []
    for part in _csv(text):
        try:
            budgets.append(parse_budget(part, n_samples))
        except ValueError as exc:
            raise SystemExit(f"quality: error: budget '{part}': {exc}") from None
    return list(dict.fromkeys(budgets))


def prune_config(args: argparse.Namespace, method: str, seed: int, budget: int) -> PruneConfig:
    """The configuration `dealrec prune --method M --budget B --seed S` builds (core.params.resolve,
    as the CLI calls it): the seed drives the surrogate, influence and selection; the effort config
    keeps its default seed, so the LLM effort scores are one cache entry shared by every seed and
    method. A variant spec's options (bench/variants.py) are overrides like the CLI's flags."""
    from core.params import PruneOverrides, resolve

    base, overrides = variants.parse(method, METHODS)
    sel, effort = overrides.get("selection", {}), overrides.get("effort", {})
    return resolve(PruneOverrides(
        method=base, budget=budget, seed=seed, lam=sel.get("lambda"), strata=sel.get("strata"),
        hard_prune=sel.get("hard_prune"), normalize=sel.get("normalize"),
        surrogate={} if args.epochs is None else {"epochs": args.epochs}, llm=args.llm, device=args.device,
        precision=args.precision, effort_loss=effort.get("loss"),
        effort_length_correction=effort.get("length_correction")), n_samples=budget)  # a count: N does not enter


# ----------------------------------------------------------------------------------------------
# Cells: one (method, seed, budget) selection + evaluation, cached as JSON in OUT/cells


@dataclass(frozen=True)
class Cell:
    method: str  # a pruning method, or FULL
    seed: int
    budget: int  # the number of samples for FULL

    def cfg(self, args: argparse.Namespace) -> PruneConfig:
        # FULL selects nothing; its surrogate is the pipeline's (same surrogate config and seed).
        return prune_config(args, "random" if self.method == FULL else self.method, self.seed, self.budget)

    def path(self, out: Path, ds: RecDataset, args: argparse.Namespace) -> Path:
        cfg = self.cfg(args)
        # Everything the result depends on; FULL depends on the surrogate config and seed only.
        parts = {"surrogate": key_dump(cfg.surrogate), "seed": self.seed} if self.method == FULL \
            else {"cfg": key_dump(cfg, mode="json")}
        if (ref := variants.matched_reference(self.method)) is not None:  # the draw copies that selection
            parts["match"] = {"rule": "history-length-v2",
                              "cfg": key_dump(prune_config(args, ref, self.seed, self.budget), mode="json")}
        key = cache_key("quality-cell", data=ds.fingerprint, method=self.method, budget=self.budget, **parts)
        return out / "cells" / f"{self.method}-seed{self.seed}-b{self.budget}-{key.rsplit('-', 1)[1]}.json"


def load_cell(path: Path) -> dict[str, Any] | None:
    try:
        cell = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or half-written by an older interrupted run: recompute
    return cell if isinstance(cell, dict) and cell.get("format") == CELL_FORMAT else None


def save_cell(path: Path, cell: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(cell, indent=1).encode())


@dataclass
class Context:
    ds: RecDataset
    args: argparse.Namespace
    out: Path
    cache_dir: Path
    device: Any  # torch.device for the surrogate evaluation
    status: Callable[[str], None]  # one-line progress message


def run_cell(cell: Cell, ctx: Context) -> tuple[dict[str, Any], bool]:
    """The cell's result (from OUT/cells when finished earlier) and whether it came from there."""
    path = cell.path(ctx.out, ctx.ds, ctx.args)
    if not ctx.args.fresh and (done := load_cell(path)) is not None:
        return done, True
    result = full_cell(cell, ctx) if cell.method == FULL else pruned_cell(cell, ctx)
    save_cell(path, result)
    return result, False


def _train_progress(ctx: Context, cell: Cell) -> Callable[[float, str], None]:
    return lambda frac, msg="": ctx.status(f"{cell.method} s{cell.seed} b{cell.budget} train: {msg}")


def pruned_cell(cell: Cell, ctx: Context) -> dict[str, Any]:
    from core.evaluate.surrogate import surrogate_level
    from core.pipeline import run_prune

    cfg = cell.cfg(ctx.args)
    if (ref := variants.matched_reference(cell.method)) is not None:
        return matched_cell(cell, ref, ctx)
    t0 = time.perf_counter()
    ctx.status(f"{cell.method} s{cell.seed} b{cell.budget} select")
    pruned = run_prune(ctx.ds, cfg, device=ctx.args.device, cache_dir=ctx.cache_dir, store_root=ctx.args.effort_store,
                       progress=lambda stage, frac, msg="": ctx.status(
                           f"{cell.method} s{cell.seed} b{cell.budget} {stage}: {msg}"))
    select_seconds = time.perf_counter() - t0
    selected = [int(u) for u in pruned.selection.selected]
    quality = surrogate_level(ctx.ds, selected, cfg.surrogate, cfg.seed, device=ctx.device,
                              progress=_train_progress(ctx, cell))
    record = _cell_record(cell, select_seconds, quality, selected=selected, notes=pruned.selection.notes,
                          stages={name: {"seconds": round(rec.seconds, 3), "cached": rec.cached,
                                         "skipped": rec.skipped} for name, rec in pruned.stages.items()})
    return {**record, **_score_refs(ctx.out, pruned)}


def matched_cell(cell: Cell, ref: str, ctx: Context) -> dict[str, Any]:
    """`random+match=M`: a random draw with the history lengths of M's selection (same seed and
    budget; M's cell is run first if need be), trained on as every other cell (bench/matched.py)."""
    from bench.matched import history_lengths, length_matched_draw
    from core.evaluate.surrogate import surrogate_level

    reference, _ = run_cell(Cell(ref, cell.seed, cell.budget), ctx)
    t0 = time.perf_counter()
    selected = length_matched_draw(ctx.ds, reference["selected"], cell.seed)
    select_seconds = time.perf_counter() - t0
    lengths = history_lengths(ctx.ds)
    shared = len(set(selected) & set(reference["selected"]))
    notes = [f"history lengths of {ref}'s selection (mean {lengths[reference['selected']].mean():.2f} items, "
             f"pool {lengths.mean():.2f}); {shared} of {len(selected)} samples are also in it"]
    cfg = cell.cfg(ctx.args)
    quality = surrogate_level(ctx.ds, selected, cfg.surrogate, cfg.seed, device=ctx.device,
                              progress=_train_progress(ctx, cell))
    return _cell_record(cell, select_seconds, quality, selected=selected, notes=notes, stages={})


def _score_refs(out: Path, pruned) -> dict[str, Any]:
    """The cell's diagnostics, and its per-sample scores as files under OUT/scores/ named by content
    (a score shared by several cells, e.g. one seed's influence, is stored once)."""
    import hashlib
    import io

    refs = {}
    for name, values in sorted(pruned.scores.items()):
        arr = np.asarray(values)
        digest = hashlib.sha256(arr.tobytes() + str(arr.dtype).encode()).hexdigest()[:16]
        rel = f"scores/{name}-{digest}.npz"
        if not (out / rel).is_file():
            buf = io.BytesIO()
            np.savez_compressed(buf, **{name: arr})
            atomic_write_bytes(out / rel, buf.getvalue())
        refs[name] = rel
    return {"scores": refs, "diagnostics": pruned.diagnostics}


def full_cell(cell: Cell, ctx: Context) -> dict[str, Any]:
    """The full-data reference: the surrogate trained on every sample. The pipeline trains and caches
    exactly this model (same data, config, seed) for any surrogate-based method, so reuse its report
    when it is there; train it otherwise."""
    from core.evaluate.surrogate import from_report, surrogate_level
    from core.stages.scoring import surrogate_key
    from core.surrogate.train import load_checkpoint

    cfg = cell.cfg(ctx.args)
    path = ctx.cache_dir / surrogate_key(ctx.ds, cfg) / "surrogate.pt"
    report = None
    if path.is_file():
        try:
            report = json.loads(load_checkpoint(path)[1].get("report_json", "null"))
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            log.warning("full data: cached surrogate %s unreadable (%s): training it", path, exc)
    if report and report.get("test"):
        quality, source = from_report(report, ctx.ds.n_samples, report["train_seconds"]), "pipeline cache"
    else:
        quality = surrogate_level(ctx.ds, None, cfg.surrogate, cfg.seed, device=ctx.device,
                                  progress=_train_progress(ctx, cell))
        source = "trained"
    return _cell_record(cell, 0.0, quality, selected=None, notes=[f"surrogate: {source}"], stages={})


def _cell_record(cell: Cell, select_seconds: float, quality: dict[str, Any], *, selected: list[int] | None,
                 notes: list[str], stages: dict[str, Any]) -> dict[str, Any]:
    return {"format": CELL_FORMAT, "method": cell.method, "seed": cell.seed, "budget": cell.budget,
            "select_seconds": round(select_seconds, 3), "stages": stages, "notes": list(notes),
            "eval": quality, "selected": selected,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _log_cell(cell: dict[str, Any], resumed: bool) -> None:
    ev = cell["eval"]
    stages = ", ".join(f"{k} {v['seconds']:.1f}s{' cached' if v['cached'] else ''}"
                       for k, v in cell["stages"].items() if not v["skipped"])
    log.info("%s seed %d budget %d%s: select %.1fs (%s), train %.1fs (best epoch %d): R@20 %.4f N@20 %.4f",
             cell["method"], cell["seed"], cell["budget"], " [from cell cache]" if resumed else "",
             cell["select_seconds"], stages or "-", ev["seconds"], ev["best_epoch"],
             ev["metrics"]["recall@20"], ev["metrics"]["ndcg@20"])


# ----------------------------------------------------------------------------------------------
# Aggregation


def summarize(results: dict[Cell, dict[str, Any]], methods: list[str], seeds: list[int],
              budget: int, n_users: int) -> dict[str, dict[str, dict[str, float]]]:
    """method -> metric -> mean/std over seeds at `budget`, the full-data row first."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in [FULL, *methods]:
        cells = [results[Cell(method, s, n_users if method == FULL else budget)] for s in seeds]
        out[method] = {m: mean_std(c["eval"]["metrics"][m] for c in cells) for m in METRICS}
    return out


def timings(results: dict[Cell, dict[str, Any]], methods: list[str], seeds: list[int], budget: int,
            n_users: int) -> dict[str, dict[str, float]]:
    out = {}
    for method in [FULL, *methods]:
        cells = [results[Cell(method, s, n_users if method == FULL else budget)] for s in seeds]
        sel = [c["select_seconds"] for c in cells]
        train = [c["eval"]["seconds"] for c in cells]
        out[method] = {"select_mean_s": float(np.mean(sel)), "train_mean_s": float(np.mean(train)),
                       "total_s": float(np.sum(sel) + np.sum(train)),
                       "best_epoch_mean": float(np.mean([c["eval"]["best_epoch"] for c in cells]))}
    return out


# ----------------------------------------------------------------------------------------------
# Reports


def _best_methods(summary: dict[str, dict[str, dict[str, float]]], metric: str) -> set[str]:
    pruned = {m: v[metric]["mean"] for m, v in summary.items() if m != FULL}
    top = max(pruned.values(), default=math.nan)
    return {m for m, v in pruned.items() if v == top}


def table_md(summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Rows methods, columns metrics; the best pruning method per column in bold (as the paper)."""
    lines = ["| method | " + " | ".join(SHORT[m] for m in METRICS) + " |",
             "| --- |" + " --- |" * len(METRICS)]
    best = {m: _best_methods(summary, m) for m in METRICS}
    for method, row in summary.items():
        cells = [f"**{_fmt(row[m])}**" if method in best[m] else _fmt(row[m]) for m in METRICS]
        lines.append(f"| {label(method)} | " + " | ".join(cells) + " |")
    return lines


def timing_md(times: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| method | select s / seed | train surrogate s / seed | best epoch (mean) | total s |",
             "| --- | --- | --- | --- | --- |"]
    for method, t in times.items():
        lines.append(f"| {label(method)} | {t['select_mean_s']:.1f} | {t['train_mean_s']:.1f} | "
                     f"{t['best_epoch_mean']:.1f} | {t['total_s']:.1f} |")
    return lines


def cells_md(results: dict[Cell, dict[str, Any]], resumed: set[Cell]) -> list[str]:
    head = ["method", "seed", "budget", "select s", "stages (s; c = cached)", "train s", "best epoch", "R@20",
            "N@20", "this run"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    order = {m: i for i, m in enumerate((*METHODS, FULL))}
    for cell, r in sorted(results.items(), key=lambda kv: (kv[0].budget, order[variants.base_method(kv[0].method)],
                                                            kv[0].method, kv[0].seed)):
        stages = ", ".join(f"{k} {v['seconds']:.1f}{' c' if v['cached'] else ''}"
                           for k, v in r["stages"].items() if not v["skipped"]) or "; ".join(r["notes"])
        ev = r["eval"]
        lines.append(f"| {label(cell.method)} | {cell.seed} | {cell.budget} | {r['select_seconds']:.1f} | {stages} | "
                     f"{ev['seconds']:.1f} | {ev['best_epoch']} | {ev['metrics']['recall@20']:.4f} | "
                     f"{ev['metrics']['ndcg@20']:.4f} | {'cell cache' if cell in resumed else 'computed'} |")
    return lines


def header_md(title: str, args: argparse.Namespace, meta: dict[str, Any]) -> list[str]:
    data = (f"- data: `{args.data}`, {meta['users']} users (training samples), {meta['items']} items, "
            f"fingerprint `{meta['fingerprint']}`")
    surrogate = (f"- surrogate: SASRec, max {meta['epochs']} epochs, early stop on validation Recall@20 of the "
                 "training users; each row trains it on that method's selection only")
    return [f"# {title}", "", "```", command_line(args), "```", "", data,
            f"- test: full ranking over all items, seen items excluded, {meta['test_users']} users with a test item",
            f"- seeds: {', '.join(map(str, meta['seeds']))} (mean ± sample std over seeds)", surrogate,
            f"- device: {meta['device']}, {meta['threads']} torch threads; finished {meta['finished']}", ""]


TIMING_NOTE = ("Wall time per method (the selection reads core's cache where a score was computed before: "
               "the surrogate and influence are paid once per seed, the LLM effort once, by the first method "
               "needing them; the full-data row shows that surrogate's own training, already paid inside the "
               "selection of the first surrogate-based method of the seed):")


def results_md(args, meta, budgets, summaries, times, results, resumed) -> str:
    lines = header_md("Surrogate-level quality of the selected samples", args, meta)
    for budget in budgets:
        lines += [f"## Budget {budget} samples ({100 * budget / meta['users']:.2f}% of {meta['users']})", "",
                  *table_md(summaries[budget]), "", TIMING_NOTE, "", *timing_md(times[budget]), ""]
    lines += ["## Cells", "", *cells_md(results, resumed), ""]
    return "\n".join(lines)


def ratio_md(args, meta, budgets, methods, curve, full) -> str:
    lines = header_md("Surrogate-level quality vs. selection ratio", args, meta)
    head = ["budget", "ratio"] + [f"{label(m)} {SHORT[k]}" for m in methods for k in RATIO_METRICS]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for b in budgets:
        row = [str(b), f"{100 * b / meta['users']:.2f}%"]
        row += [_fmt(curve[m][b][k]) for m in methods for k in RATIO_METRICS]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| " + " | ".join([f"{meta['users']} (full)", "100%"] + [_fmt(full[k]) for _ in methods
                                                                          for k in RATIO_METRICS]) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg: no display needed)


def plot_results(path: Path, summaries: dict[int, dict], meta: dict[str, Any]) -> bool:
    """Grouped bars: one group per metric, one bar per method, error bars = std over seeds; a row of
    panels (Recall, NDCG) per budget."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(len(summaries), 2, figsize=(13, 4.2 * len(summaries)), squeeze=False)
    for row, (budget, summary) in zip(axes, summaries.items()):
        methods = list(summary)
        width = 0.8 / len(methods)
        for ax, kind in zip(row, ("recall", "ndcg")):
            metrics = [m for m in METRICS if m.startswith(kind)]
            x = np.arange(len(metrics))
            for i, method in enumerate(methods):
                means = [summary[method][m]["mean"] for m in metrics]
                stds = [summary[method][m]["std"] for m in metrics]
                ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
                       label=label(method), color="0.6" if method == FULL else None,
                       hatch="//" if method == FULL else None)
            ax.set_xticks(x, [SHORT[m] for m in metrics])
            ax.set_title(f"{'Recall' if kind == 'recall' else 'NDCG'}, budget {budget} of {meta['users']} users")
            ax.grid(axis="y", alpha=0.3)
        row[0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"Surrogate trained on the selection, test over all users (mean ± std, {len(meta['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_ratio(path: Path, budgets: list[int], methods: list[str], curve: dict, full: dict, meta: dict) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(RATIO_METRICS), figsize=(11, 4.2), squeeze=False)
    ratios = [100 * b / meta["users"] for b in budgets]
    for ax, metric in zip(axes[0], RATIO_METRICS):
        for method in methods:
            ax.errorbar(ratios, [curve[method][b][metric]["mean"] for b in budgets],
                        yerr=[curve[method][b][metric]["std"] for b in budgets], marker="o", capsize=3,
                        label=label(method))
        ax.axhline(full[metric]["mean"], color="0.4", linestyle="--", label="full data")
        ax.axhspan(full[metric]["mean"] - full[metric]["std"], full[metric]["mean"] + full[metric]["std"],
                   color="0.8", alpha=0.5)
        ax.set_xscale("log")
        ax.minorticks_off()  # the log axis's own 2x10^1-style labels would collide with the budget ticks
        ax.set_xticks(ratios, [f"{r:.2g}%" for r in ratios])
        ax.set_xlabel(f"selection ratio (of {meta['users']} samples)")
        ax.set_title(SHORT[metric])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# Main


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # this script's per-cell lines always; core's per-epoch lines with -v


STATUS_EVERY_S = 2.0


def _status_bar(total: int, enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, desc="cells", unit="cell", disable=not enabled, file=sys.stderr)
    last = [0.0]

    def status(msg: str) -> None:
        # Core reports every LiSSA step and epoch; redrawing that often floods a redirected stderr.
        now = time.monotonic()
        refresh = now - last[0] >= STATUS_EVERY_S
        if refresh:
            last[0] = now
        bar.set_postfix_str(msg[:90], refresh=refresh)

    return bar, status


def _cells_for(methods: list[str], seeds: list[int], budgets: list[int], n_users: int) -> list[Cell]:
    """Seed-major, the full-data cell last in each seed: by then a surrogate-based method has put the
    full-data surrogate into core's cache, and an interrupted run has whole seeds finished."""
    cells = []
    for seed in seeds:
        cells += [Cell(m, seed, b) for b in budgets for m in methods]
        cells.append(Cell(FULL, seed, n_users))
    return cells


def _ratio_budgets(args: argparse.Namespace, n_users: int) -> list[int]:
    budgets = sorted(parse_budgets(args.ratio_budgets, n_users))
    too_big = [b for b in budgets if b >= n_users]
    if too_big:
        log.warning("ratio curve: skipping budget(s) %s, not below the %d samples", too_big, n_users)
    return [b for b in budgets if b < n_users]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from core.data import DataError, load_dataset
    from core.device import resolve_device
    from core.effort.llm import LLMError, resolve_llm

    torch.set_num_threads(max(1, args.threads or len(os.sched_getaffinity(0))))
    if args.skipped:
        log.info("--no-llm: skipping %s (they need the LLM's effort score)", ", ".join(dict.fromkeys(args.skipped)))
    t0 = time.perf_counter()
    try:
        ds = load_dataset(args.data, limit_users=args.limit_users)
        if any(_needs_llm(m) for m in args.methods + args.ratio_methods):
            resolve_llm(args.llm)  # fail now, not after an hour of other methods
    except (DataError, LLMError) as exc:
        sys.stderr.write(f"quality: error: {exc}\n")
        return 2
    log.info("loaded %d users, %d items in %.1fs (fingerprint %s)", ds.n_users, ds.n_items,
             time.perf_counter() - t0, ds.fingerprint)

    seeds = list(range(args.seeds))
    budgets = parse_budgets(args.budgets, ds.n_samples)
    if args.llm_eval:
        return main_llm(args, ds, seeds, budgets, t0)
    ratio_budgets = [] if args.skip_ratio or not args.ratio_methods else _ratio_budgets(args, ds.n_samples)
    out = out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    cells = _cells_for(args.methods, seeds, budgets, ds.n_samples)
    cells += [Cell(m, s, b) for s in seeds for b in ratio_budgets for m in args.ratio_methods]
    cells = list(dict.fromkeys(cells))  # ratio points at a table budget are the table's cells
    cells, sharded = _shard(cells, args.shard)

    bar, status = _status_bar(len(cells), not args.no_progress)
    ctx = Context(ds, args, out, Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
                  resolve_device(args.device), status)
    done = _run_cells(cells, lambda cell: run_cell(cell, ctx), lambda cell, r, cached: _log_cell(r, cached),
                      bar, out / "cells")
    if done is None:
        return 130
    results, resumed = done
    if _shard_finished(sharded, args, len(cells), t0):
        return 0

    report = write_reports(args, ds, out, ctx.device, seeds, budgets, ratio_budgets, results, resumed,
                           time.perf_counter() - t0)
    log.info("wrote %s in %.1fs (%d cells, %d from the cell cache)", out, time.perf_counter() - t0, len(cells),
             len(resumed))
    if args.json:
        _print_summary(report["summary"][str(budgets[0])])
    return 0


def _shard(cells: list, spec: str | None) -> tuple[list, bool]:
    """Every N-th cell from I for `--shard I/N` (whole list and False without it)."""
    if not spec:
        return cells, False
    try:
        i, n = (int(x) for x in spec.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise SystemExit(f"quality: error: --shard '{spec}' is not I/N with 0 <= I < N") from None
    return cells[i::n], True


def _shard_finished(sharded: bool, args: argparse.Namespace, n_cells: int, t0: float) -> bool:
    """After a --shard run: say so; the reports need every cell (a run without --shard writes them)."""
    if sharded:
        log.info("shard %s: %d cells done in %.1fs; run without --shard to write the reports", args.shard, n_cells,
                 time.perf_counter() - t0)
    return sharded


def _run_cells(cells: list, run: Callable, log_one: Callable, bar, kept_in: Path) -> tuple[dict, set] | None:
    """Run (or load) every cell in order: ({cell: result}, cells served from their cache), or None
    after Ctrl-C (what finished is kept in `kept_in`; rerunning resumes)."""
    results, resumed = {}, set()
    try:
        for cell in cells:
            results[cell], was_cached = run(cell)
            if was_cached:
                resumed.add(cell)
            log_one(cell, results[cell], was_cached)
            bar.update(1)
    except KeyboardInterrupt:
        log.warning("interrupted: %d of %d cells finished are kept in %s; rerun the same command to resume",
                    len(results), len(cells), kept_in)
        return None
    finally:
        bar.close()
    return results, resumed


def _print_summary(summary: dict[str, dict[str, dict[str, float]]]) -> None:
    """--json: the last stdout line, row -> metric -> {"mean", "std"}."""
    print(json.dumps({m: {k: {"mean": v["mean"], "std": v["std"]} for k, v in row.items()}
                      for m, row in summary.items()}))


def out_dir(args: argparse.Namespace) -> Path:
    """OUT: --out, else bench/results/quality-<limit-users or all>."""
    return Path(args.out) if args.out else ROOT / "bench" / "results" / f"quality-{args.limit_users or 'all'}"


def main_llm(args: argparse.Namespace, ds: RecDataset, seeds: list[int], budgets: list[int], t0: float) -> int:
    """--llm-eval: the LLM-level rows (bench/llm_level.py); selections from the surrogate-level cells."""
    from core.device import resolve_device

    out = out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    all_cells = llm_level.llm_cells(args.methods, seeds, budgets, with_base=not args.no_base and not args.nll_only)
    cells, sharded = _shard(all_cells, args.shard)
    bar, status = _status_bar(len(cells), not args.no_progress)
    ctx = Context(ds, args, out, Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
                  resolve_device(args.device), status)

    def selection_of(method: str, seed: int, budget: int) -> list[int]:
        cell, _ = run_cell(Cell(method, seed, budget), ctx)
        return list(cell["selected"])

    def log_one(cell, r: dict, was_cached: bool) -> None:
        m = r["metrics"]
        log.info("LLM level %s%s: R@20 %s N@20 %s Rank %% %s NLL %s over %d users (fine-tune %s, generate %.0fs)",
                 cell.label(), " [from cell cache]" if was_cached else "",
                 *(f"{m[k]:.4f}" if k in m else "-" for k in ("recall@20", "ndcg@20", "rank_pct", "nll")), m["users"],
                 f"{r['finetune']['train_seconds']:.0f}s" if r["finetune"] else "-",
                 r["eval_seconds"].get("generate", 0.0))

    done = _run_cells(cells, lambda cell: llm_level.run_llm_cell(cell, ctx, selection_of), log_one, bar,
                      out / "llm-cells")
    if done is None:
        return 130
    results, resumed = done
    if _shard_finished(sharded, args, len(cells), t0):
        return 0
    report = llm_level.write_llm_reports(args, ds, out, ctx.device, seeds, budgets, args.methods, results, resumed,
                                         time.perf_counter() - t0, label)
    log.info("wrote %s in %.1fs (%d LLM cells, %d from the cell cache)", report["written"], time.perf_counter() - t0,
             len(cells), len(resumed))
    if args.json:
        _print_summary(report["summary"][str(budgets[0])])
    return 0


def write_reports(args, ds, out: Path, device, seeds, budgets, ratio_budgets, results, resumed,
                  seconds) -> dict[str, Any]:
    """results.md / results.png / results.json, and ratio.md / ratio.png when there is a curve."""
    import torch

    meta = {"users": ds.n_users, "items": ds.n_items, "fingerprint": ds.fingerprint, "seeds": seeds,
            "test_users": next(iter(results.values()))["eval"]["test_users"],
            "epochs": prune_config(args, "random", 0, 1).surrogate.epochs,
            "device": str(device), "threads": torch.get_num_threads(),
            "finished": time.strftime("%Y-%m-%d %H:%M")}
    summaries = {b: summarize(results, args.methods, seeds, b, ds.n_samples) for b in budgets}
    times = {b: timings(results, args.methods, seeds, b, ds.n_samples) for b in budgets}
    (out / f"{args.report}.md").write_text(results_md(args, meta, budgets, summaries, times, results, resumed))
    plot_results(out / f"{args.report}.png", summaries, meta)
    report: dict[str, Any] = {
        "command": command_line(args), "data": str(args.data), "limit_users": args.limit_users, **meta,
        "budgets": budgets, "methods": args.methods, "wall_seconds": round(seconds, 1),
        "config": prune_config(args, "dealrec", 0, budgets[0]).model_dump(mode="json"),
        "summary": {str(b): s for b, s in summaries.items()}, "timings": {str(b): t for b, t in times.items()},
        # The selected indices stay in OUT/cells (one file per cell); here only their count.
        "cells": [{**r, "selected": len(r["selected"]) if r["selected"] is not None else None,
                   "from_cell_cache": c in resumed} for c, r in results.items()],
    }
    if ratio_budgets:
        curve = {m: {b: summarize(results, [m], seeds, b, ds.n_samples)[m] for b in ratio_budgets}
                 for m in args.ratio_methods}
        full = summaries[budgets[0]][FULL]
        (out / "ratio.md").write_text(ratio_md(args, meta, ratio_budgets, args.ratio_methods, curve, full))
        plot_ratio(out / "ratio.png", ratio_budgets, args.ratio_methods, curve, full, meta)
        report["ratio"] = {"budgets": ratio_budgets, "methods": args.ratio_methods,
                           "summary": {m: {str(b): v for b, v in c.items()} for m, c in curve.items()}}
    atomic_write_bytes(out / f"{args.report}.json", json.dumps(report, indent=1).encode())
    return report


if __name__ == "__main__":
    sys.exit(main())
