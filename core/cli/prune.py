"""`dealrec prune`: score and select, write the selection files, print a per-stage summary."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

from core.cli.common import Bars, UsageError, available_cores, usage_error

log = logging.getLogger("dealrec")


def prune_overrides(args: argparse.Namespace):
    """The run `dealrec prune`'s flags describe (core.params resolves it against the dataset). Records
    in `args.set_by` which `--surrogate`/`--influence` item set each field, for the error messages."""
    from core.config import InfluenceConfig, SurrogateConfig
    from core.params import PruneOverrides, without_none

    args.set_by = {}
    surrogate = field_settings("--surrogate", args.surrogate, SurrogateConfig,
                               without_none(epochs=args.epochs), args.set_by)
    influence = field_settings("--influence", args.influence, InfluenceConfig,
                               without_none(solver=args.solver), args.set_by)
    return PruneOverrides(
        method=args.method, budget=args.budget, seed=args.seed, lam=args.lam, strata=args.strata,
        hard_prune=args.hard_prune, normalize=args.normalize, surrogate=surrogate,
        influence=influence, llm=args.llm, gguf_file=args.gguf_file, adapter=args.adapter,
        device=args.device, precision=args.precision, cutoff_len=args.cutoff_len,
        effort_processes=args.effort_processes, effort_loss=args.effort_loss,
        effort_length_correction=args.effort_length_correction)


def _is_text(annotation) -> bool:
    """A str field, or a Literal of strings (a solver's name): its value is taken as written."""
    if annotation is str:
        return True
    return get_origin(annotation) is Literal and all(isinstance(a, str) for a in get_args(annotation))


def field_settings(flag: str, items: list[str], model, shortcuts: dict, set_by: dict[str, str]) -> dict:
    """`FIELD=VALUE` items of a repeatable flag as a dict for one config section (`model`'s fields):
    text fields take the value as written, the others read it as JSON (numbers; `true`/`false` only
    for a bool field, never as 1/0 for a number). The section's shortcut flags (`--epochs`, `--solver`)
    join them; setting a field twice, or one the section lacks, is a usage error naming the flag.
    Pydantic validates the values afterwards; `set_by` gets "section.field" -> the item that set it."""
    fields = model.model_fields
    section = flag.removeprefix("--")
    out = dict(shortcuts)
    # The shortcut flags are named after their field (--epochs, --solver).
    given = {name: f"--{name.replace('_', '-')}" for name in shortcuts}
    for item in items:
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name:
            raise UsageError(f"{flag} '{item}': expected FIELD=VALUE, e.g. {flag} {next(iter(fields))}=...")
        if name not in fields:
            raise UsageError(f"{flag} '{item}': no field '{name}'; the fields are {', '.join(fields)}")
        if name in out:
            raise UsageError(f"{flag} '{item}': {name} is set twice (also by {given[name]})")
        annotation = fields[name].annotation
        if _is_text(annotation):
            value = text
        else:
            try:
                value = json.loads(text)
            except ValueError:
                value = text  # not a number: pydantic's message names the field and the value
            if isinstance(value, bool) and annotation is not bool:
                raise UsageError(f"{flag} '{item}': {name} takes a number, not {text}")
        out[name] = value
        given[name] = set_by[f"{section}.{name}"] = f"{flag} {name}"
    return out


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
        cfg = resolve(prune_overrides(args), ds.n_samples)
    except ParamsError as exc:
        raise usage_error(exc, args.set_by) from None
    from core.effort.llm import resolve_llm
    from core.selection import required_scores

    if "effort" in required_scores(cfg.selection.method):
        resolve_llm(cfg.effort.llm, cfg.effort.gguf_file)  # fail before hours of work, not after
    log.info("loaded %d users (%d with a training sample), %d items (fingerprint %s)", ds.n_users, ds.n_samples,
             ds.n_items, ds.fingerprint)
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    init = _warm_start(args, cfg, cache_dir)
    bars = Bars(enabled=not args.no_progress)
    try:
        result = run_prune(ds, cfg, device=args.device, cache_dir=cache_dir, progress=bars, use_cache=not args.no_cache,
                           surrogate_init=init)
    finally:
        bars.close()
    result.stages = {**load_stage, **result.stages}
    records = bigrec_records(ds, result.selection.selected, cfg.effort, cache_dir)
    paths = write_outputs(result, Path(args.out), records, args.limit_users)
    _summary(result, paths)
    return 0


def _warm_start(args: argparse.Namespace, cfg, cache_dir: Path | None) -> Path | None:
    """The surrogate of --warm-start's dataset (same settings), or None without the flag."""
    if not args.warm_start:
        return None
    from core.data import load_dataset
    from core.pipeline import previous_surrogate
    from core.selection import required_scores

    if not required_scores(cfg.selection.method) & {"influence", "grand", "el2n"}:
        raise UsageError(f"--warm-start: method '{cfg.selection.method}' trains no surrogate")
    previous = load_dataset(args.warm_start, fmt=args.format, split=args.split, limit_users=args.limit_users)
    init = previous_surrogate(previous, cfg, cache_dir)
    if init is None:
        raise UsageError(f"--warm-start: no surrogate of '{args.warm_start}' with these settings in the cache; "
                         f"prune it first with the same --method, --seed and surrogate settings")
    return init


def _summary(result, paths) -> None:
    out = sys.stdout
    sel = result.selection
    out.write(f"\nselected {len(sel.selected)} of {result.dataset.n_samples} samples with "
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
