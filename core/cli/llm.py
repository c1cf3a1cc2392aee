"""`dealrec finetune` (LoRA on a selection) and `dealrec evaluate` (BIGRec evaluation of the LLM)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from core.cli.common import Bars, UsageError, available_cores, cache_dir_of, validated_params

log = logging.getLogger("dealrec")


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
    from core.stages.llm import finetune_checkpoint

    sel = read_selection(Path(args.selection))
    limit = sel["limit_users"]
    if args.limit_users is not None and args.limit_users != limit:
        raise UsageError(f"--limit-users {args.limit_users} differs from the selection's ({limit}); "
                         "omit it to use the selection's")
    effort = sel["params"].get("effort") if isinstance(sel["params"].get("effort"), dict) else {}
    llm = args.llm or effort.get("llm") or "auto"
    gguf_file = args.gguf_file if args.llm else (args.gguf_file or effort.get("gguf_file"))
    cfg = validated_params(FinetuneConfig, {
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
        if not 0 <= index < ds.n_samples or ds.user_ids[index] != user_id:
            raise UsageError(f"{sel['path']}: selected sample {index} (user '{user_id}') is not in the dataset")
    users = sorted({index for index, _ in sel["selected"]})
    bars = Bars(enabled=not args.no_progress)
    try:
        meta = run_finetune(ds, users, cfg, Path(args.out), cache_dir=cache_dir_of(args),
                            progress=lambda f, m: bars("finetune", f, m),
                            checkpoint=finetune_checkpoint(Path(args.out)),
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
    cfg = validated_params(LLMEvalConfig, {
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
    bars = Bars(enabled=not args.no_progress)
    try:
        result = run_evaluate(ds, cfg, cache_dir=cache_dir_of(args), use_cache=not args.no_cache, progress=bars,
                              journal=out_dir / "predictions.partial.jsonl")
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
    (out_dir / "predictions.partial.jsonl").unlink(missing_ok=True)  # the run is kept whole: no resume needed
    out = sys.stdout
    out.write(f"\n{'adapter ' + args.adapter if args.adapter else 'base model'} on {metrics['users']} test users "
              f"({doc['seconds_per_user']:.2f} s per user)\n")
    ks = sorted(cfg.ks)
    out.write("  " + "  ".join(f"{m}@{k}".ljust(10) for k in ks for m in ("recall", "ndcg")) + "\n")
    out.write("  " + "  ".join(f"{metrics[f'{m}@{k}']:<10.4f}" for k in ks for m in ("recall", "ndcg")) + "\n")
    dense = ([f"the true item at {metrics['rank_pct']:.1f} % of the ranking on average"]
             if metrics.get("rank_pct") is not None else []) + \
        ([f"mean NLL of the true title {metrics['nll']:.4f}"] if metrics.get("nll") is not None else [])
    if dense:
        out.write(f"  {'; '.join(dense)} (lower is better)\n")
    out.write(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'predictions.jsonl'}\n")
    return 0
