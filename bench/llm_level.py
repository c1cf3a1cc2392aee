"""LLM-level comparison for `bench/quality.py --llm-eval`: fine-tune the LLM on each method's
selection and evaluate it BIGRec-style on one fixed subset of test users.

For each (method, seed, budget): the selection is the surrogate-level cell's (the same `run_prune`
configuration, computed when that cell is missing), `core.finetune.run_finetune` trains a LoRA
adapter on it, and `core.evaluate.bigrec.run_evaluate` generates a title per test user, grounds it
and scores Recall/NDCG@10/20/50. The test users are the same for every row (their subset seed is
the evaluation's, not the training seed), so two methods can be compared user by user: the report
adds, for each method against the reference, the paired difference with its bootstrap interval and a
sign-flip test (bench/paired.py), and the decision rule of docs/RESULTS.md over those tests.

Each result is kept as JSON under OUT/llm-cells/ (an interrupted run resumes); adapters are kept
under OUT/llm-adapters/, keyed by what they depend on, so an evaluation interrupted after its
fine-tuning reuses the adapter, in a later session too when OUT is committed (a LoRA adapter of
SmolLM2 is under 2 MB). The `base` row evaluates the LLM without any fine-tuning.
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
from bench.paired import ALPHA, SAMPLES, decide, paired_test
from core.cache import atomic_write_bytes, cache_key
from core.config import FinetuneConfig, LLMEvalConfig, key_dump
from core.data.dataset import RecDataset

log = logging.getLogger("bench.quality")

BASE = "base"  # the LLM without fine-tuning
LLM_CELL_FORMAT = "dealrec-quality-llm-cell-v1"


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
    g.add_argument("--test-users", type=int, default=500,
                   help="fixed random subset of test users (500; 0 = every user with a test item)")
    g.add_argument("--test-seed", type=int, default=0, help="seed of that subset (0)")
    g.add_argument("--num-beams", type=int, default=4, help="beam search width (4)")
    # 95% of Games titles fit in 32 tokens (quotes and EOS included); a model that does not stop pays
    # for every token allowed.
    g.add_argument("--max-new-tokens", type=int, default=32, help="generation length limit (32)")
    g.add_argument("--gen-batch-size", type=int, default=4, help="prompts per generate() call (4)")
    g.add_argument("--no-base", action="store_true", help="no row for the LLM without fine-tuning")
    g.add_argument("--nll-only", action="store_true",
                   help="screening: fine-tune, then only each test user's NLL of the true title (no generation); "
                        "reports llm-nll.md / llm-nll.json")
    g.add_argument("--reference", default="random",
                   help="the method every other one is compared with, per seed and pooled over seeds (random)")
    g.add_argument("--llm-micro-batch-tokens", type=int, default=0,
                   help="fine-tuning micro-batches by padded tokens instead of --llm-micro-batch-size (0 = off)")


def finetune_config(args: argparse.Namespace, seed: int) -> FinetuneConfig:
    return FinetuneConfig(llm=args.llm, epochs=args.llm_epochs, batch_size=args.llm_batch_size,
                          micro_batch_size=min(args.llm_micro_batch_size, args.llm_batch_size), lr=args.llm_lr,
                          warmup_steps=args.llm_warmup_steps, device=args.device, precision=args.precision,
                          micro_batch_tokens=args.llm_micro_batch_tokens, seed=seed)


def eval_config(args: argparse.Namespace, adapter: Path | None) -> LLMEvalConfig:
    return LLMEvalConfig(llm=args.llm, adapter=str(adapter) if adapter else None, num_beams=args.num_beams,
                         max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size,
                         test_users=args.test_users or None, seed=args.test_seed, device=args.device,
                         precision=args.precision, generate=not args.nll_only)


@dataclass(frozen=True)
class LLMCell:
    method: str  # a pruning method, or BASE
    seed: int  # training seed (LoRA init, shuffling, dropout) and the selection's seed
    budget: int  # 0 for BASE

    def key(self, ds: RecDataset, args: argparse.Namespace, selected: Sequence[int] | None) -> str:
        ev = key_dump(eval_config(args, None), mode="json")
        parts: dict[str, Any] = {"data": ds.fingerprint, "method": self.method, "budget": self.budget, "eval": ev}
        if self.method != BASE:
            parts["selection"] = _selection_hash(selected)
            parts["finetune"] = key_dump(finetune_config(args, self.seed), mode="json")
        return cache_key("quality-llm-cell", **parts).rsplit("-", 1)[1]

    def adapter_key(self, ds: RecDataset, args: argparse.Namespace, selected: Sequence[int]) -> str:
        """What the fine-tuned adapter depends on (not the evaluation: a screening cell and a full one
        share it)."""
        return cache_key("quality-llm-adapter", data=ds.fingerprint, selection=_selection_hash(selected),
                         finetune=key_dump(finetune_config(args, self.seed), mode="json"))

    def label(self) -> str:
        return BASE if self.method == BASE else f"{self.method} s{self.seed} b{self.budget}"


def _selection_hash(selected: Sequence[int] | None) -> str:
    return hashlib.sha256(json.dumps(sorted(selected or [])).encode()).hexdigest()[:20]


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
    from core.stages.llm import finetune_checkpoint

    args = ctx.args
    selected = None if cell.method == BASE else selection_of(cell.method, cell.seed, cell.budget)
    key = cell.key(ctx.ds, args, selected)
    path = ctx.out / "llm-cells" / f"{cell.method}-seed{cell.seed}-b{cell.budget}-{key}.json"
    if not args.fresh and (done := load_llm_cell(path)) is not None:
        return done, True

    finetune: dict[str, Any] | None = None
    adapter = None
    if cell.method != BASE:
        key = cell.adapter_key(ctx.ds, args, selected)
        adapter = ctx.out / "llm-adapters" / key.rsplit("-", 1)[1]
        meta = None if args.fresh else read_meta(adapter)
        if meta is None and not args.fresh:  # where earlier runs kept it
            legacy = ctx.cache_dir / "bench-llm" / key / "adapter"
            adapter, meta = (legacy, m) if (m := read_meta(legacy)) is not None else (adapter, None)
        if meta is None:
            ctx.status(f"{cell.label()} finetune: loading")
            # An interrupted fine-tune resumes from its checkpoint beside the adapter (commit it to carry
            # a cell across machines).
            meta = run_finetune(ctx.ds, selected, finetune_config(args, cell.seed), adapter, cache_dir=ctx.cache_dir,
                                progress=lambda f, m="": ctx.status(f"{cell.label()} finetune {100 * f:.0f}%: {m}"),
                                checkpoint=finetune_checkpoint(adapter))
        else:
            log.info("%s: adapter from %s", cell.label(), adapter)
        finetune = {k: meta[k] for k in ("train_samples", "valid_samples", "mean_train_tokens", "epochs_run",
                                         "best_epoch", "stopped_early", "steps", "history", "train_seconds",
                                         "seconds_per_sample", "precision", "device")}
    # Generation for all test users takes an hour or more on one core: its finished batches are kept
    # beside the cell (commit the file to carry an unfinished cell to another session or machine).
    journal = path.with_name(f"{path.stem}.partial.jsonl")
    if args.fresh:  # recompute means recompute: no batch of an earlier run is reused
        journal.unlink(missing_ok=True)
    result = run_evaluate(
        ctx.ds, eval_config(args, adapter), cache_dir=ctx.cache_dir, journal=journal,
        progress=lambda stage, f, m="": ctx.status(f"{cell.label()} eval {stage} {100 * f:.0f}%: {m}"))
    record = {
        "format": LLM_CELL_FORMAT, "method": cell.method, "seed": cell.seed, "budget": cell.budget,
        "selected": len(selected) if selected is not None else 0,
        "finetune": finetune,
        "metrics": result["metrics"],
        "eval_seconds": {k: round(v, 1) for k, v in result["seconds"].items()},
        "eval": {k: result["params"][k] for k in ("num_beams", "max_new_tokens", "test_users", "seed", "embed_with",
                                                   "exclude_seen", "device", "precision", "batch_size", "generate")},
        "generation": result.get("generation"),
        # Per test user, for paired comparisons and for reading what the model generates.
        "users": [{k: p[k] for k in ("user", "generated", "target_rank", "target_full_rank", "rank_pct", "metrics",
                                     "nll", "answer_tokens") if k in p}
                  for p in result["predictions"]],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    journal.unlink(missing_ok=True)
    return record, False


def llm_cells(methods: Sequence[str], seeds: Sequence[int], budgets: Sequence[int], with_base: bool) -> list[LLMCell]:
    cells = [LLMCell(BASE, 0, 0)] if with_base else []
    return cells + [LLMCell(m, s, b) for b in budgets for s in seeds for m in methods]


# ----------------------------------------------------------------------------------------------
# Aggregation and the paired comparison

NLL = "nll"  # each test user's mean NLL per token of the true title (and EOS): lower is better
# Where the true item lands in the whole ranking, % of the items (lower is better): dense where
# Recall@20 sees a dozen hits per thousand users. Cells from before it was recorded lack it.
RANK = "rank_pct"
DENSE = (RANK, NLL)  # per-user signals stored beside "metrics", both lower-is-better
COMPARED = ("recall@20", "ndcg@20", "recall@50")
DENSE_LABEL = {RANK: "Rank %", NLL: "NLL"}


def label_of(metric: str) -> str:
    return SHORT.get(metric) or DENSE_LABEL[metric]


def per_user(cell: dict[str, Any], metric: str) -> np.ndarray:
    """One value per test user, NaN where the user has none (no rank, no NLL)."""
    if metric in DENSE:
        values = [u.get(metric) for u in cell["users"]]
    else:
        values = [u["metrics"][metric] for u in cell["users"]]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def has_metric(cell: dict[str, Any], metric: str) -> bool:
    """Whether the cell recorded `metric` (cells from before a dense signal existed lack it for every
    user; a user without a value of a recorded signal is left out where it is compared)."""
    users = cell["users"]
    if metric in DENSE:
        return any(u.get(metric) is not None for u in users)
    return bool(users) and "metrics" in users[0]


def _metrics_of(results: dict[LLMCell, dict[str, Any]], cells: Sequence[LLMCell]) -> list[str]:
    found = [m for m in METRICS if all(has_metric(results[c], m) for c in cells)]
    return found + [m for m in DENSE if all(has_metric(results[c], m) for c in cells)]


def summarize_llm(results: dict[LLMCell, dict[str, Any]], methods: Sequence[str], seeds: Sequence[int],
                  budget: int, with_base: bool) -> dict[str, dict[str, dict[str, float]]]:
    """row -> metric -> mean/std over seeds (the metrics every cell of the row has: Recall/NDCG@K
    with generation, the rank percentile where the cells recorded it, NLL with the answer scored)."""
    out = {}
    rows = ([(BASE, [LLMCell(BASE, 0, 0)])] if with_base else []) + \
        [(m, [LLMCell(m, s, budget) for s in seeds]) for m in methods]
    for name, cells in rows:
        out[name] = {k: mean_std(float(np.nanmean(per_user(results[c], k))) if k in DENSE else results[c]["metrics"][k]
                                 for c in cells) for k in _metrics_of(results, cells)}
    return out


def _same_users(cells: Sequence[dict[str, Any]]) -> None:
    first = [u["user"] for u in cells[0]["users"]]
    if any([u["user"] for u in c["users"]] != first for c in cells[1:]):
        raise ValueError("the cells were evaluated on different test users")


def comparisons(results: dict[LLMCell, dict[str, Any]], methods: Sequence[str], seeds: Sequence[int],
                budget: int, reference: str) -> list[dict[str, Any]]:
    """Each other method against `reference` on the same test users: per seed (hits@K and the paired
    test of R@20, N@20, R@50, the rank percentile and NLL, bench/paired.py), then pooled over the seeds
    (seed "all": each user's difference averaged over the seeds; hits summed over them)."""
    if reference not in methods:
        return []
    out = []
    for other in [m for m in methods if m != reference]:
        pairs = [(results[LLMCell(other, s, budget)], results[LLMCell(reference, s, budget)]) for s in seeds]
        _same_users([c for pair in pairs for c in pair])
        metrics = [m for m in (*COMPARED, *DENSE) if all(has_metric(c, m) for pair in pairs for c in pair)]
        for seed, group in [*((s, [pair]) for s, pair in zip(seeds, pairs)), ("all", pairs)]:
            row: dict[str, Any] = {"a": other, "b": reference, "seed": seed, "budget": budget,
                                   "users": len(pairs[0][0]["users"])}
            for metric in metrics:
                # (seeds in the group, users): users are resampled and sign-flipped with their seeds together.
                xa = np.stack([per_user(a, metric) for a, _ in group])
                xb = np.stack([per_user(b, metric) for _, b in group])
                # One draw seed for every row: a one-seed report's seed row and pooled row are the same
                # data and must show the same numbers.
                row[metric] = paired_test(xa, xb, seed=0, lower_is_better=metric in DENSE)
            if "recall@20" in metrics:
                row.update({f"hits@{k}": [int(sum(u["target_rank"] is not None and u["target_rank"] < k
                                                  for pair in group for u in pair[j]["users"])) for j in (0, 1)]
                            for k in (10, 20, 50)})
            out.append(row)
    return out


# ----------------------------------------------------------------------------------------------
# Reports


def _fmt_row(row: dict[str, float]) -> str:
    return fmt_mean_std(row) if row["n"] > 1 else f"{row['mean']:.4f}"


def _fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _fmt_diff(d: dict[str, Any], users: int) -> str:
    fewer = f" ({d['users']} users)" if d.get("users", users) != users else ""
    return f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], p {_fmt_p(d['p'])}{fewer}"


DECIDING = ("recall@20", "ndcg@20")  # the rule: p < ALPHA on either, and not worse on the NLL


def decision_md(decisions: list[dict[str, Any]], label) -> list[str]:
    """The decision rule's verdict per method, with what it rests on."""
    if not decisions:
        return []
    ref = label(decisions[0]["reference"])
    lines = ["", "## Decision", "",
             (f"Rule (docs/RESULTS.md): a method beats {ref} where its pooled one-sided p is below {ALPHA} on "
              f"R@20 or N@20 and its NLL is not worse (the one-sided p for \"worse\" is not below {ALPHA}). The "
              f"Holm column applies the rule with the p-values adjusted over all {2 * len(decisions)} tests of this "
              "table (methods x R@20/N@20). Seeds agree: the deciding metric's difference is positive in every "
              "seed (the p-values treat the fine-tuning runs as given; this is how far the runs move it; - with "
              "one seed)."), "",
             f"| method | p R@20 | p N@20 | NLL not worse | beats {ref} | after Holm | "
             "seeds agree (per-seed difference) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for d in decisions:
        guard = "not checked" if d["guard_ok"] is None else ("yes" if d["guard_ok"] else "**no**")
        lines.append(f"| {label(d['method'])} | {_fmt_p(d['p']['recall@20'])} | {_fmt_p(d['p']['ndcg@20'])} | "
                     f"{guard} | {'**yes**' if d['beats'] else 'no'} | {'**yes**' if d['beats_holm'] else 'no'} | "
                     f"{'-' if d['seeds_agree'] is None else 'yes' if d['seeds_agree'] else 'no'} "
                     f"({label_of(d['best_metric'])}: {', '.join(f'{x:+.4f}' for x in d['per_seed'])}) |")
    return lines


def llm_md(args, meta: dict[str, Any], budget: int, summary, results, comps, resumed: set[LLMCell], label) -> str:
    ft = finetune_config(args, 0)
    ev = eval_config(args, None)
    users = f"{meta['test_users']} test users" + (" (every user with a test item)" if ev.test_users is None else
                                                  f" (a subset drawn with seed {ev.seed})")
    micro = (f"micro-batches of at most {ft.micro_batch_tokens} padded tokens" if ft.micro_batch_tokens
             else f"micro-batch {ft.micro_batch_size}")
    what = ("each test user's NLL of the true title only (teacher forced, no generation)" if args.nll_only else
            f"beam search {ev.num_beams} beams, at most {ev.max_new_tokens} new tokens, generated text and item titles "
            "embedded by the base LLM (last token, last layer), all items ranked by L2 distance, seen items not "
            "excluded (as the reference); Rank % = where the true item lands in the whole ranking, in % of the "
            "items, mean over users (lower is better); NLL = each user's mean negative log-likelihood per token of "
            "the true title and EOS, teacher forced (lower is better)")
    metrics = [m for m in (*METRICS, *DENSE) if all(m in row for row in summary.values())]
    lines = [
        "# LLM-level quality of the selected samples (BIGRec)" + (": NLL screening" if args.nll_only else ""), "",
        "```", command_line(args), "```", "",
        (f"- data: `{args.data}`, {meta['users']} users (training samples), {meta['items']} items, fingerprint "
         f"`{meta['fingerprint']}`"),
        f"- LLM: `{args.llm}` ({meta['llm']}), {meta['device']}, {meta['threads']} torch threads",
        (f"- fine-tuning: LoRA r {ft.lora_r} / alpha {ft.lora_alpha} / dropout {ft.lora_dropout} on "
         f"{'+'.join(ft.lora_target_modules)}, {ft.epochs} epochs at most (early stopping on the selected users' "
         f"validation samples, patience {ft.patience}), effective batch {ft.batch_size} ({micro}), lr {ft.lr:g}, "
         f"{ft.warmup_steps} warmup updates, cutoff {ft.cutoff_len}, loss on the whole prompt"),
        f"- evaluation: the same {users} for every row; {what}",
        f"- seeds: {', '.join(map(str, meta['seeds']))} (the selection's and the fine-tuning's seed); "
        f"finished {meta['finished']}", "",
        f"## Budget {budget} samples ({100 * budget / meta['users']:.2f}% of {meta['users']})", "",
        "Mean ± sample std over seeds" + (f" ({', '.join(label_of(m) for m in DENSE if m in metrics)}: lower is better)"
                                          if set(DENSE) & set(metrics) else "") + ":", "",
        "| method | " + " | ".join(label_of(m) for m in metrics) + " |", "| --- |" + " --- |" * len(metrics)]
    for method, row in summary.items():
        name = "base LLM (no fine-tuning)" if method == BASE else label(method)
        lines.append(f"| {name} | " + " | ".join(_fmt_row(row[m]) if m in row else "-" for m in metrics) + " |")
    if comps:
        shown = [m for m in (*COMPARED, *DENSE) if m in comps[0]]
        lines += ["", (f"Paired on the same test users, each method minus {label(comps[0]['b'])}; a negative "
                       "difference is better for Rank % and NLL, a positive one for Recall/NDCG. 95% interval from "
                       f"{SAMPLES:,} bootstrap resamples of the users; p = one-sided paired sign-flip test "
                       f"({SAMPLES:,} draws) of \"the method is better\"; seed \"all\" pools the seeds: each "
                       "user's difference averaged over them, hits summed over them. Both treat each seed's "
                       "fine-tuning run as given (per-seed rows show how far the runs move it):"), "",
                  "| method | seed | users | " + ("hits@20 | hits@50 | " if "recall@20" in shown else "")
                  + " | ".join(f"{label_of(m)} difference [95% CI], p" for m in shown) + " |",
                  "| --- | --- | --- |" + (" --- | --- |" if "recall@20" in shown else "") + " --- |" * len(shown)]
        for c in comps:
            hits = f"{c['hits@20'][0]} vs {c['hits@20'][1]} | {c['hits@50'][0]} vs {c['hits@50'][1]} | " \
                if "hits@20" in c else ""
            seed = "**all**" if c["seed"] == "all" else c["seed"]
            lines.append(f"| {label(c['a'])} | {seed} | {c['users']} | {hits}"
                         + " | ".join(_fmt_diff(c[m], c["users"]) for m in shown) + " |")
        pooled = [c for c in comps if c["seed"] == "all"]
        if pooled and all("mde80" in c[m] for c in pooled for m in shown):
            lines += ["", ("Smallest difference each pooled comparison detects (p < 0.05 one-sided, 80% power, from "
                           "the spread of its per-user differences): "
                           + "; ".join(f"{label(c['a'])}: " + ", ".join(f"{label_of(m)} {c[m]['mde80']:.4f}"
                                                                        for m in shown) for c in pooled) + ".")]
        lines += decision_md(decide(pooled, DECIDING, NLL), label)
    lines += ["", "## Cells", "",
              ("| row | seed | train samples | valid samples | epochs (best) | train loss first → last | "
               "valid loss best | fine-tune s (s/sample/epoch) | generate s (s/user) | this run |"),
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    def order(kv):
        return kv[0].method != BASE, kv[0].budget, kv[0].method, kv[0].seed

    for cell, r in sorted(results.items(), key=order):
        f = r["finetune"]
        gen = r["eval_seconds"].get("generate", 0.0)
        n_users = max(1, len(r["users"]))
        name = "base LLM" if cell.method == BASE else label(cell.method)
        if f:
            hist = f["history"]
            valid = [h["valid_loss"] for h in hist if "valid_loss" in h]
            ft_cols = (f"{f['train_samples']} | {f['valid_samples']} | {f['epochs_run']} ({f['best_epoch']}) | "
                       f"{hist[0]['train_loss']:.3f} → {hist[-1]['train_loss']:.3f} | "
                       f"{f'{min(valid):.3f}' if valid else '-'} | "
                       f"{f['train_seconds']:.0f} ({f['seconds_per_sample']:.2f})")
        else:
            ft_cols = "- | - | - | - | - | -"
        lines.append(f"| {name} | {cell.seed} | {ft_cols} | {gen:.0f} ({gen / n_users:.2f}) | "
                     f"{'cell cache' if cell in resumed else 'computed'} |")
    return "\n".join(lines) + "\n"


def plot_llm(path: Path, summary: dict[str, dict[str, dict[str, float]]], label, meta, budget: int) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    kinds = [k for k in ("recall", "ndcg") if all(f"{k}@20" in row for row in summary.values())]
    panels = kinds + [m for m in DENSE if all(m in row for row in summary.values())]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    methods = list(summary)
    width = 0.8 / len(methods)
    titles = {"recall": "Recall", "ndcg": "NDCG", NLL: "NLL of the true title (lower is better)",
              RANK: "true item's place in the ranking, % (lower is better)"}
    for ax, kind in zip(axes[0], panels):
        metrics = [kind] if kind in DENSE else [m for m in METRICS if m.startswith(kind)]
        x = np.arange(len(metrics))
        for i, method in enumerate(methods):
            # One seed has no spread to draw: no error bars rather than misleading zero-width ones.
            spread = [summary[method][m]["std"] for m in metrics] if summary[method][metrics[0]]["n"] > 1 else None
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, [summary[method][m]["mean"] for m in metrics], width,
                   yerr=spread, capsize=2, label="base LLM" if method == BASE else label(method),
                   color="0.6" if method == BASE else None, hatch="//" if method == BASE else None)
        ax.set_xticks(x, [SHORT.get(m) or {NLL: "NLL per title token", RANK: "mean rank %"}[m] for m in metrics])
        ax.set_title(titles[kind] + f", LLM fine-tuned on {budget} samples", fontsize=9)
        if kind in DENSE:
            lows = [summary[m][kind]["mean"] for m in methods]
            ax.set_ylim(min(lows) * 0.97, max(lows) * 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    seeds = len(meta["seeds"])
    fig.suptitle(f"BIGRec evaluation, {meta['test_users']} test users, "
                 + (f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed (paired intervals: the .md)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_llm_reports(args, ds: RecDataset, out: Path, device, seeds, budgets, methods, results, resumed,
                      seconds: float, label: Callable[[str], str]) -> dict[str, Any]:
    """llm.md / llm.png / llm.json (llm-nll.* with --nll-only; <--report>.* when given) for the first
    budget (the json for every budget)."""
    import torch

    from core.effort.llm import resolve_llm

    # --report names them where it is given (e.g. a report over the seeds finished so far).
    stem = args.report if args.report != "results" else ("llm-nll" if args.nll_only else "llm")
    with_base = any(c.method == BASE for c in results)
    meta = {"users": ds.n_users, "items": ds.n_items, "fingerprint": ds.fingerprint, "seeds": list(seeds),
            "llm": resolve_llm(args.llm).key(), "device": str(device), "threads": torch.get_num_threads(),
            "test_users": len(next(iter(results.values()))["users"]), "finished": time.strftime("%Y-%m-%d %H:%M")}
    summaries = {b: summarize_llm(results, methods, seeds, b, with_base) for b in budgets}
    comps = {b: comparisons(results, methods, seeds, b, args.reference) for b in budgets}
    budget = budgets[0]
    (out / f"{stem}.md").write_text(llm_md(args, meta, budget, summaries[budget], results, comps[budget], resumed,
                                           label))
    plot_llm(out / f"{stem}.png", summaries[budget], label, meta, budget)
    report = {"command": command_line(args), **meta, "budgets": budgets, "methods": list(methods),
              "reference": args.reference, "wall_seconds": round(seconds, 1),
              "finetune": finetune_config(args, 0).model_dump(mode="json"),
              "evaluation": eval_config(args, None).model_dump(mode="json"),
              "summary": {str(b): s for b, s in summaries.items()}, "paired": {str(b): c for b, c in comps.items()},
              "decision": {str(b): decide([r for r in c if r["seed"] == "all"], DECIDING, NLL)
                           for b, c in comps.items()},
              "cells": [{k: v for k, v in r.items() if k != "users"} | {"from_cell_cache": c in resumed}
                        for c, r in results.items()]}
    atomic_write_bytes(out / f"{stem}.json", json.dumps(report, indent=1).encode())
    return report | {"written": str(out / f"{stem}.md")}
