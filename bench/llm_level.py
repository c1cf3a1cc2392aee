"""LLM-level comparison for `bench/quality.py --llm-eval`: fine-tune the LLM on each method's
selection and evaluate it BIGRec-style on one fixed subset of test users.

For each (method, seed, budget): the selection is the surrogate-level cell's (the same `run_prune`
configuration, computed when that cell is missing), `core.finetune.run_finetune` trains a LoRA
adapter on it, and `core.evaluate.bigrec.run_evaluate` generates a title per test user, grounds it
and scores Recall/NDCG@10/20/50. The test users are the same for every row (their subset seed is
the evaluation's, not the training seed), so two methods can be compared user by user: the report
adds a paired bootstrap interval for the difference of each method against the first one.

Each result is kept as JSON under OUT/llm-cells/ (an interrupted run resumes); adapters live in
core's cache folder, keyed like their cell, so an evaluation interrupted after its fine-tuning
reuses the adapter. The `base` row evaluates the LLM without any fine-tuning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import METRICS, SHORT, command_line, fmt_mean_std, mean_std, pyplot
from core.cache import atomic_write_bytes, cache_key
from core.config import FinetuneConfig, LLMEvalConfig, key_dump
from core.data.dataset import RecDataset

log = logging.getLogger("bench.quality")

BASE = "base"  # the LLM without fine-tuning
LLM_CELL_FORMAT = "dealrec-quality-llm-cell-v1"
BOOTSTRAP_SAMPLES = 10_000


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("LLM level (--llm-eval)")
    g.add_argument("--llm-eval", action="store_true",
                   help="run the LLM-level comparison instead of the surrogate-level table: fine-tune the LLM on "
                        "each method's selection, BIGRec evaluation on a fixed subset of test users "
                        "(--methods defaults to dealrec,random and --seeds to 1 in this mode)")
    # Defaults: a few-epoch run that fits a CPU (docs/RESULTS.md). The reference recipe is
    # --llm-epochs 50 --llm-batch-size 128 --llm-lr 1e-4; at 2 epochs that is 16 updates, all inside
    # the 20-update warmup, and at lr 1e-4 even 64 updates (batch 32) left SmolLM2 echoing the prompt
    # instead of writing a title (docs/RESULTS.md).
    g.add_argument("--llm-epochs", type=int, default=2, help="fine-tuning epochs (2; the recipe: up to 50)")
    g.add_argument("--llm-batch-size", type=int, default=32, help="effective batch (32; the recipe: 128)")
    g.add_argument("--llm-micro-batch-size", type=int, default=4, help="samples per forward pass (4)")
    g.add_argument("--llm-lr", type=float, default=1e-3, help="learning rate (1e-3; the recipe: 1e-4)")
    g.add_argument("--llm-warmup-steps", type=int, default=20, help="warmup updates (20, the recipe)")
    g.add_argument("--test-users", type=int, default=500, help="fixed random subset of test users (500)")
    g.add_argument("--test-seed", type=int, default=0, help="seed of that subset (0)")
    g.add_argument("--num-beams", type=int, default=4, help="beam search width (4)")
    # 95% of Games titles fit in 32 tokens (quotes and EOS included); a model that does not stop pays
    # for every token allowed.
    g.add_argument("--max-new-tokens", type=int, default=32, help="generation length limit (32)")
    g.add_argument("--gen-batch-size", type=int, default=4, help="prompts per generate() call (4)")
    g.add_argument("--no-base", action="store_true", help="no row for the LLM without fine-tuning")


def finetune_config(args: argparse.Namespace, seed: int) -> FinetuneConfig:
    return FinetuneConfig(llm=args.llm, epochs=args.llm_epochs, batch_size=args.llm_batch_size,
                          micro_batch_size=min(args.llm_micro_batch_size, args.llm_batch_size), lr=args.llm_lr,
                          warmup_steps=args.llm_warmup_steps, device=args.device, precision=args.precision,
                          seed=seed)


def eval_config(args: argparse.Namespace, adapter: Path | None) -> LLMEvalConfig:
    return LLMEvalConfig(llm=args.llm, adapter=str(adapter) if adapter else None, num_beams=args.num_beams,
                         max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size,
                         test_users=args.test_users, seed=args.test_seed, device=args.device,
                         precision=args.precision)


@dataclass(frozen=True)
class LLMCell:
    method: str  # a pruning method, or BASE
    seed: int  # training seed (LoRA init, shuffling, dropout) and the selection's seed
    budget: int  # 0 for BASE

    def key(self, ds: RecDataset, args: argparse.Namespace, selected: Sequence[int] | None) -> str:
        ev = key_dump(eval_config(args, None), mode="json")
        parts: dict[str, Any] = {"data": ds.fingerprint, "method": self.method, "budget": self.budget, "eval": ev}
        if self.method != BASE:
            parts["selection"] = hashlib.sha256(json.dumps(sorted(selected or [])).encode()).hexdigest()[:20]
            parts["finetune"] = key_dump(finetune_config(args, self.seed), mode="json")
        return cache_key("quality-llm-cell", **parts).rsplit("-", 1)[1]

    def label(self) -> str:
        return BASE if self.method == BASE else f"{self.method} s{self.seed} b{self.budget}"


def load_llm_cell(path: Path) -> dict[str, Any] | None:
    try:
        cell = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cell if isinstance(cell, dict) and cell.get("format") == LLM_CELL_FORMAT else None


def run_llm_cell(cell: LLMCell, ctx, selection_of: Callable[[str, int, int], list[int]]) -> tuple[dict[str, Any], bool]:
    """The cell's result (from OUT/llm-cells when finished earlier) and whether it came from there.
    `selection_of(method, seed, budget)` gives the surrogate-level cell's selected sample indices."""
    from core.evaluate.bigrec import run_evaluate
    from core.finetune import read_meta, run_finetune

    args = ctx.args
    selected = None if cell.method == BASE else selection_of(cell.method, cell.seed, cell.budget)
    key = cell.key(ctx.ds, args, selected)
    path = ctx.out / "llm-cells" / f"{cell.method}-seed{cell.seed}-b{cell.budget}-{key}.json"
    if not args.fresh and (done := load_llm_cell(path)) is not None:
        return done, True

    finetune: dict[str, Any] | None = None
    adapter = None
    if cell.method != BASE:
        adapter = ctx.cache_dir / "bench-llm" / key / "adapter"
        meta = None if args.fresh else read_meta(adapter)
        if meta is None:
            ctx.status(f"{cell.label()} finetune: loading")
            meta = run_finetune(ctx.ds, selected, finetune_config(args, cell.seed), adapter, cache_dir=ctx.cache_dir,
                                progress=lambda f, m="": ctx.status(f"{cell.label()} finetune {100 * f:.0f}%: {m}"))
        else:
            log.info("%s: adapter from %s", cell.label(), adapter)
        finetune = {k: meta[k] for k in ("train_samples", "valid_samples", "mean_train_tokens", "epochs_run",
                                         "best_epoch", "stopped_early", "steps", "history", "train_seconds",
                                         "seconds_per_sample", "precision", "device")}
    result = run_evaluate(ctx.ds, eval_config(args, adapter), cache_dir=ctx.cache_dir,
                          progress=lambda stage, f, m="": ctx.status(f"{cell.label()} eval {stage} {100 * f:.0f}%: {m}"))
    record = {
        "format": LLM_CELL_FORMAT, "method": cell.method, "seed": cell.seed, "budget": cell.budget,
        "selected": len(selected) if selected is not None else 0,
        "finetune": finetune,
        "metrics": result["metrics"],
        "eval_seconds": {k: round(v, 1) for k, v in result["seconds"].items()},
        "eval": {k: result["params"][k] for k in ("num_beams", "max_new_tokens", "test_users", "seed", "embed_with",
                                                   "exclude_seen", "device", "precision")},
        # Per test user, for paired comparisons and for reading what the model generates.
        "users": [{"user": p["user"], "generated": p["generated"], "target_rank": p["target_rank"],
                   "metrics": p["metrics"]} for p in result["predictions"]],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    return record, False


def llm_cells(methods: Sequence[str], seeds: Sequence[int], budgets: Sequence[int], with_base: bool) -> list[LLMCell]:
    cells = [LLMCell(BASE, 0, 0)] if with_base else []
    return cells + [LLMCell(m, s, b) for b in budgets for s in seeds for m in methods]


# ----------------------------------------------------------------------------------------------
# Aggregation and the paired comparison


def per_user(cell: dict[str, Any], metric: str) -> np.ndarray:
    return np.array([u["metrics"][metric] for u in cell["users"]], dtype=np.float64)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, seed: int = 0,
                     samples: int = BOOTSTRAP_SAMPLES) -> dict[str, float]:
    """Mean of a - b over the same users, its 95% percentile interval from resampling users, and the
    share of resamples in which a - b <= 0 (a one-sided bootstrap p-value for "a beats b")."""
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired samples need the same non-zero number of users")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(samples, diff.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": float(diff.mean()), "ci95": [float(lo), float(hi)], "p_not_better": float((means <= 0).mean())}


def summarize_llm(results: dict[LLMCell, dict[str, Any]], methods: Sequence[str], seeds: Sequence[int],
                  budget: int, with_base: bool) -> dict[str, dict[str, dict[str, float]]]:
    out = {}
    rows = ([(BASE, [LLMCell(BASE, 0, 0)])] if with_base else []) + \
        [(m, [LLMCell(m, s, budget) for s in seeds]) for m in methods]
    for name, cells in rows:
        out[name] = {k: mean_std(results[c]["metrics"][k] for c in cells) for k in METRICS}
    return out


def comparisons(results: dict[LLMCell, dict[str, Any]], methods: Sequence[str], seeds: Sequence[int],
                budget: int) -> list[dict[str, Any]]:
    """Each later method against the first (`--methods dealrec,random`: DEALRec minus Random), per
    seed, on the same test users: hits@K and the paired bootstrap of R@20, N@20 and R@50."""
    out = []
    if len(methods) < 2:
        return out
    ref = methods[0]
    for other in methods[1:]:
        for seed in seeds:
            a, b = results[LLMCell(ref, seed, budget)], results[LLMCell(other, seed, budget)]
            if [u["user"] for u in a["users"]] != [u["user"] for u in b["users"]]:
                raise ValueError("the two cells were evaluated on different test users")
            row: dict[str, Any] = {"a": ref, "b": other, "seed": seed, "budget": budget, "users": len(a["users"])}
            for metric in ("recall@20", "ndcg@20", "recall@50"):
                row[metric] = paired_bootstrap(per_user(a, metric), per_user(b, metric), seed=seed)
            for k in (10, 20, 50):
                row[f"hits@{k}"] = [int(sum(u["target_rank"] is not None and u["target_rank"] < k for u in c["users"]))
                                    for c in (a, b)]
            out.append(row)
    return out


# ----------------------------------------------------------------------------------------------
# Reports


def llm_md(args, meta: dict[str, Any], budget: int, summary, results, comps, resumed: set[LLMCell], labels) -> str:
    ft = finetune_config(args, 0)
    ev = eval_config(args, None)
    lines = [
        "# LLM-level quality of the selected samples (BIGRec)", "", "```", command_line(args), "```", "",
        (f"- data: `{args.data}`, {meta['users']} users (training samples), {meta['items']} items, fingerprint "
        f"`{meta['fingerprint']}`"),
        f"- LLM: `{args.llm}` ({meta['llm']}), {meta['device']}, {meta['threads']} torch threads",
        (f"- fine-tuning: LoRA r {ft.lora_r} / alpha {ft.lora_alpha} / dropout {ft.lora_dropout} on "
        f"{'+'.join(ft.lora_target_modules)}, {ft.epochs} epochs at most (early stopping on the selected users' "
        f"validation samples, patience {ft.patience}), effective batch {ft.batch_size} (micro-batch "
        f"{ft.micro_batch_size}), lr {ft.lr:g}, {ft.warmup_steps} warmup updates, cutoff {ft.cutoff_len}, loss on the "
        "whole prompt"),
        (f"- evaluation: the same {ev.test_users} test users for every row (subset seed {ev.seed}), beam search "
        f"{ev.num_beams} beams, at most {ev.max_new_tokens} new tokens, generated text and item titles embedded by the "
        "base LLM (last token, last layer), all items ranked by L2 distance, seen items not excluded (as the reference)"),
        f"- seeds: {', '.join(map(str, meta['seeds']))} (selection and training seed); finished {meta['finished']}", "",
        f"## Budget {budget} samples ({100 * budget / meta['users']:.2f}% of {meta['users']})", "",
        "| method | " + " | ".join(SHORT[m] for m in METRICS) + " |", "| --- |" + " --- |" * len(METRICS)]
    for method, row in summary.items():
        name = "base LLM (no fine-tuning)" if method == BASE else labels[method]
        lines.append(f"| {name} | " + " | ".join(fmt_mean_std(row[m]) if row[m]["n"] > 1 else f"{row[m]['mean']:.4f}"
                                                for m in METRICS) + " |")
    if comps:
        lines += ["", ("Paired on the same test users (difference first minus second; 95% interval from "
                  f"{BOOTSTRAP_SAMPLES:,} bootstrap resamples of the users; p = share of resamples where the first "
                  "is not better):"), "",
                  ("| first vs second | seed | users | hits@20 | hits@50 | R@20 difference [95% CI], p | "
                  "N@20 difference [95% CI], p |"), "| --- | --- | --- | --- | --- | --- | --- |"]
        for c in comps:
            cols = [f"{c[m]['diff']:+.4f} [{c[m]['ci95'][0]:+.4f}, {c[m]['ci95'][1]:+.4f}], p {c[m]['p_not_better']:.2f}"
                    for m in ("recall@20", "ndcg@20")]
            lines.append(f"| {labels[c['a']]} vs {labels[c['b']]} | {c['seed']} | {c['users']} | "
                         f"{c['hits@20'][0]} vs {c['hits@20'][1]} | {c['hits@50'][0]} vs {c['hits@50'][1]} | "
                         + " | ".join(cols) + " |")
    lines += ["", "## Cells", "",
              ("| row | seed | train samples | valid samples | epochs (best) | train loss first → last | valid loss best | "
              "fine-tune s (s/sample/epoch) | generate s (s/user) | this run |"),
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cell, r in sorted(results.items(), key=lambda kv: (kv[0].method != BASE, kv[0].budget, kv[0].method, kv[0].seed)):
        f = r["finetune"]
        gen = r["eval_seconds"].get("generate", 0.0)
        users = max(1, len(r["users"]))
        name = "base LLM" if cell.method == BASE else labels[cell.method]
        if f:
            hist = f["history"]
            valid = [h["valid_loss"] for h in hist if "valid_loss" in h]
            ft_cols = (f"{f['train_samples']} | {f['valid_samples']} | {f['epochs_run']} ({f['best_epoch']}) | "
                       f"{hist[0]['train_loss']:.3f} → {hist[-1]['train_loss']:.3f} | "
                       f"{f'{min(valid):.3f}' if valid else '-'} | "
                       f"{f['train_seconds']:.0f} ({f['seconds_per_sample']:.2f})")
        else:
            ft_cols = "- | - | - | - | - | -"
        lines.append(f"| {name} | {cell.seed} | {ft_cols} | {gen:.0f} ({gen / users:.2f}) | "
                     f"{'cell cache' if cell in resumed else 'computed'} |")
    return "\n".join(lines) + "\n"


def plot_llm(path: Path, summary: dict[str, dict[str, dict[str, float]]], labels, meta, budget: int) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(summary)
    width = 0.8 / len(methods)
    for ax, kind in zip(axes, ("recall", "ndcg")):
        metrics = [m for m in METRICS if m.startswith(kind)]
        x = np.arange(len(metrics))
        for i, method in enumerate(methods):
            # One seed has no spread to draw: no error bars rather than misleading zero-width ones.
            spread = [summary[method][m]["std"] for m in metrics] if summary[method][metrics[0]]["n"] > 1 else None
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, [summary[method][m]["mean"] for m in metrics], width,
                   yerr=spread, capsize=2,
                   label="base LLM" if method == BASE else labels[method],
                   color="0.6" if method == BASE else None, hatch="//" if method == BASE else None)
        ax.set_xticks(x, [SHORT[m] for m in metrics])
        ax.set_title(f"{'Recall' if kind == 'recall' else 'NDCG'}, LLM fine-tuned on {budget} samples")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    seeds = len(meta["seeds"])
    fig.suptitle(f"BIGRec evaluation, {meta['test_users']} test users, "
                 + (f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed (paired intervals: llm.md)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_llm_reports(args, ds: RecDataset, out: Path, device, seeds, budgets, methods, results, resumed,
                      seconds: float, labels: dict[str, str]) -> dict[str, Any]:
    """llm.md / llm.png / llm.json for the first budget (and the json for every budget)."""
    import torch

    from core.effort.llm import resolve_llm

    with_base = any(c.method == BASE for c in results)
    meta = {"users": ds.n_users, "items": ds.n_items, "fingerprint": ds.fingerprint, "seeds": list(seeds),
            "llm": resolve_llm(args.llm).key(), "device": str(device), "threads": torch.get_num_threads(),
            "test_users": len(next(iter(results.values()))["users"]), "finished": time.strftime("%Y-%m-%d %H:%M")}
    summaries = {b: summarize_llm(results, methods, seeds, b, with_base) for b in budgets}
    comps = {b: comparisons(results, methods, seeds, b) for b in budgets}
    budget = budgets[0]
    (out / "llm.md").write_text(llm_md(args, meta, budget, summaries[budget], results, comps[budget], resumed, labels))
    plot_llm(out / "llm.png", summaries[budget], labels, meta, budget)
    report = {"command": command_line(args), **meta, "budgets": budgets, "methods": list(methods),
              "wall_seconds": round(seconds, 1), "finetune": finetune_config(args, 0).model_dump(mode="json"),
              "evaluation": eval_config(args, None).model_dump(mode="json"),
              "summary": {str(b): s for b, s in summaries.items()}, "paired": {str(b): c for b, c in comps.items()},
              "cells": [{k: v for k, v in r.items() if k != "users"} | {"from_cell_cache": c in resumed}
                        for c, r in results.items()]}
    atomic_write_bytes(out / "llm.json", json.dumps(report, indent=1).encode())
    return report
