"""Per-stage time and peak memory of a DEALRec run, and, in the same run, the naive reference-style
baselines of the two hot stages.

    python bench/stages.py --data ../shared/datasets/games --limit-users 1000 [--json]

Stages (load, surrogate, influence, effort, selection) run through the pipeline with the cache off.
Baselines, on a subset of the same samples:
- influence gradients: one autograd call per sample (batch size 1) vs the batched closed form;
- effort: the reference procedure (batch 1, fp32, backward through every LoRA weight) vs ours in the
  default mode and in exact fp32, plus a bare fp32 forward pass (batch 1, no grad) of the same prompts.
With --json the last line is one JSON object (stages, speedup, effort_over_forward, ...).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import EffortConfig, PruneConfig  # noqa: E402
from core.data import load_dataset  # noqa: E402
from core.device import resolve_device  # noqa: E402
from core.effort.llm import attach_lora, load_base_model, resolve_llm  # noqa: E402
from core.effort.prompts import tokenize_samples  # noqa: E402
from core.effort.score import EffortScorer, effort_reference, find_target  # noqa: E402
from core.influence import fixed_negatives, per_sample_grads, per_sample_grads_loop, samples_with_loss  # noqa: E402
from core.instrument import StageTimer  # noqa: E402
from core.pipeline import run_prune  # noqa: E402
from core.stages.effort import effort_precision, effort_settings  # noqa: E402

log = logging.getLogger("bench.stages")
FULL_GAMES = 49_156


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def bench_influence_grads(model, ds, n_loop: int, batch_size: int) -> dict:
    """Batched closed-form per-sample gradients over ALL samples of `ds` (the real workload: batches
    ordered by length, so most are narrow) vs the reference's batch-1 autograd loop on a subset;
    per-sample rates are compared and the subset's gradients must agree."""
    users = samples_with_loss(ds)
    subset = users[np.random.default_rng(0).permutation(len(users))[:n_loop]]
    layer = model.influence_layer("last_attention_output")
    negatives = fixed_negatives(ds, model.cfg.max_seq_length, seed=0)
    model = model.eval()
    loop, t_loop = timed(per_sample_grads_loop, model, ds, subset, negatives, layer)
    position = {int(u): i for i, u in enumerate(subset)}
    fast = torch.zeros(len(subset), *layer.weight.shape)

    def batched() -> None:
        for part, g in per_sample_grads(model, ds, users, negatives, layer, batch_size):
            keep = np.flatnonzero(np.isin(part, subset))  # only the subset's (all of them: ~0.8 GB on Games)
            if keep.size:
                fast[torch.as_tensor([position[int(u)] for u in part[keep]])] = g[torch.as_tensor(keep)]

    _, t_fast = timed(batched)
    rel = float(((fast - loop).flatten(1).norm(dim=1) / loop.flatten(1).norm(dim=1).clamp_min(1e-30)).max())
    loop_rate, fast_rate = t_loop / len(subset), t_fast / len(users)
    return {"samples": len(users), "loop_samples": len(subset), "loop_s_per_sample": loop_rate,
            "batched_s_per_sample": fast_rate, "speedup": loop_rate / fast_rate, "max_rel_error": rel}


def bench_effort(ds, n: int, dev: torch.device, cache_dir: Path) -> dict:
    """The reference procedure, a bare forward, and ours (default mode and exact fp32), interleaved
    on the same prompts in one process."""
    from scipy.stats import spearmanr

    cfg = EffortConfig()
    source = resolve_llm(cfg.llm)
    base, tok = load_base_model(source, cache_dir)
    model = attach_lora(base, cfg).to(dev)
    target = find_target(model)
    rng = np.random.default_rng(0)
    users = sorted(rng.choice(ds.n_samples, size=min(n, ds.n_samples), replace=False).tolist())
    samples = tokenize_samples(ds, users, tok, cfg.cutoff_len)
    tokens = float(np.mean([len(s.ids) for s in samples]))

    def bare_forward():
        with torch.no_grad():
            for s in samples:
                model(input_ids=torch.tensor([s.ids], device=dev))

    def reference():
        return np.array([effort_reference(model, target, s, dev) for s in samples])

    _, t_fwd = timed(bare_forward)
    ref, t_ref = timed(reference)
    fp32 = EffortScorer(model, target, effort_settings(cfg, dev, "fp32"), dev, tok.eos_token_id)
    got32, t32 = timed(fp32.score, samples)
    default_precision = effort_precision(cfg, dev)
    if default_precision == "fp32":
        got, t_def = got32, t32
    else:
        fast_model = copy.deepcopy(model)
        fast = EffortScorer(fast_model, find_target(fast_model), effort_settings(cfg, dev, default_precision), dev,
                            tok.eos_token_id)
        got, t_def = timed(fast.score, samples)
    k = len(samples)
    return {
        "samples": k, "mean_tokens": tokens, "default_precision": default_precision,
        "bare_forward_s_per_sample": t_fwd / k, "reference_s_per_sample": t_ref / k,
        "fp32_s_per_sample": t32 / k, "default_s_per_sample": t_def / k,
        "fp32_max_rel_error_vs_reference": float(np.max(np.abs(got32 - ref) / ref)),
        "default_max_rel_error_vs_fp32": float(np.max(np.abs(got - got32) / got32)),
        "default_spearman_vs_fp32": float(spearmanr(got, got32).statistic) if k > 2 else 1.0,
        "speedup_default": t_ref / t_def, "speedup_fp32": t_ref / t32, "effort_over_forward": t_def / t_fwd,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit-users", type=int, default=1000)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--grad-samples", type=int, default=1000, help="samples for the batch-1 gradient loop baseline")
    ap.add_argument("--effort-samples", type=int, default=64, help="samples for the effort baselines")
    ap.add_argument("--epochs", type=int, default=None, help="cap the surrogate's epochs (default: the config's)")
    ap.add_argument("--cache-dir", default=os.environ.get("DEALREC_CACHE_DIR", "/tmp/dealrec-bench-cache"),
                    help="only the de-quantised LLM is cached; scores are recomputed")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    dev = resolve_device(args.device)
    cache_dir = Path(args.cache_dir)

    stages: dict = {}
    with StageTimer(stages, "load"):
        ds = load_dataset(args.data, limit_users=args.limit_users)
    cfg = PruneConfig.model_validate({"selection": {"budget": max(1, ds.n_samples // 50)},
                                      "surrogate": {"epochs": args.epochs} if args.epochs else {}})
    # The pipeline caches the de-quantised LLM only; use_cache=False recomputes every score.
    result = run_prune(ds, cfg, device=str(dev), cache_dir=cache_dir, use_cache=False)
    stages.update(result.stages)

    from core.surrogate.train import (
        load_checkpoint,  # noqa: F401  (model comes from the run below)
        train_surrogate,
    )

    # A short-trained surrogate is enough for timing the gradient baseline.
    small = cfg.surrogate.model_copy(update={"epochs": 1})
    model, _ = train_surrogate(ds, small, seed=0, device=dev)
    full = load_dataset(args.data)  # gradients are cheap: measure them on every sample of the data
    grads = bench_influence_grads(model, full, args.grad_samples, cfg.influence.batch_size)
    effort = bench_effort(ds, args.effort_samples, dev, cache_dir)

    eff_rate = result.effort_info.get("seconds_per_sample", effort["default_s_per_sample"])
    # The shipped default runs the stage over all users (on CPU in one single-thread process per core);
    # its per-sample rate over the whole slice is compared with the reference procedure's rate on a
    # random subset of the same users.
    effort["stage_s_per_sample"] = eff_rate
    effort["stage_mean_tokens"] = result.effort_info.get("mean_tokens")
    effort["stage_processes"] = result.effort_info.get("processes")
    effort["speedup_stage"] = effort["reference_s_per_sample"] / eff_rate
    report = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "users": ds.n_users,
        "stages": {k: {"seconds": round(v.seconds, 3), "peak_rss_mb": round(v.peak_rss_mb, 1),
                       **({"child_peak_rss_mb": round(v.child_peak_rss_mb, 1)} if v.child_peak_rss_mb else {})}
                   for k, v in stages.items()},
        "speedup": {"influence_grads": round(grads["speedup"], 2),
                    "effort": round(effort["speedup_stage"], 2),
                    "effort_fp32": round(effort["speedup_fp32"], 2)},
        "effort_over_forward": round(effort["effort_over_forward"], 3),
        "influence_grads": grads,
        "effort": effort,
        "effort_stage_s_per_sample": eff_rate,
        "full_games_effort_hours": round(eff_rate * FULL_GAMES / 3600, 2),
        "surrogate": {k: result.surrogate_report.get(k) for k in ("best_epoch", "valid", "test")}
        if result.surrogate_report else None,
    }
    _print_table(report)
    if args.json:
        print(json.dumps(report, default=float))
    return 0


def _print_table(r: dict) -> None:
    print(f"device: {r['device']}, users: {r['users']}")
    print(f"{'stage':<11}{'seconds':>10}{'peak MB':>10}  (+ largest worker process)")
    for name, v in r["stages"].items():
        child = f"  + {v['child_peak_rss_mb']:.0f}" if v.get("child_peak_rss_mb") else ""
        print(f"{name:<11}{v['seconds']:>10.2f}{v['peak_rss_mb']:>10.0f}{child}")
    g, e = r["influence_grads"], r["effort"]
    print(f"per-sample influence gradients ({g['samples']} samples): batched "
          f"{g['batched_s_per_sample'] * 1e6:.1f} us/sample, loop {g['loop_s_per_sample'] * 1e6:.1f} us/sample -> "
          f"{g['speedup']:.1f}x (max rel. error {g['max_rel_error']:.1e})")
    print(f"effort on {e['samples']} prompts ({e['mean_tokens']:.0f} tokens mean), s/sample: reference "
          f"{e['reference_s_per_sample']:.3f}, bare forward {e['bare_forward_s_per_sample']:.3f}, ours fp32 "
          f"{e['fp32_s_per_sample']:.3f} ({e['speedup_fp32']:.2f}x, max rel. error "
          f"{e['fp32_max_rel_error_vs_reference']:.1e}),"
          f" ours default/{e['default_precision']} {e['default_s_per_sample']:.3f} ({e['speedup_default']:.2f}x, "
          f"Spearman vs fp32 {e['default_spearman_vs_fp32']:.4f})")
    print(f"effort stage (default: {e['stage_processes']} process(es), {e['stage_mean_tokens']:.0f} tokens mean): "
          f"{e['stage_s_per_sample']:.3f} s/sample = {e['speedup_stage']:.2f}x the reference's rate")
    print(f"effort / bare forward: {r['effort_over_forward']:.2f}; full Games ({FULL_GAMES} samples) at the stage "
          f"rate ~{r['full_games_effort_hours']:.2f} h")


if __name__ == "__main__":
    sys.exit(main())
