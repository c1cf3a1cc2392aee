"""The scoring stages: the surrogate, its influence scores (with GraNd and EL2N), and the LLM's
effort score. Each writes its artifact atomically into core's content-addressed cache, keyed by the
dataset fingerprint and exactly the parameters it depends on, and reuses it when present.

`surrogate_stage`, `influence_stage` and `effort_stage` take explicit arguments (the bench and the
tests call them); `run_surrogate`, `run_influence` and `run_effort` are the same stages behind the
stage protocol (core/stages/base.py)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from core.cache import cache_key, default_cache_dir, load_arrays, save_arrays
from core.config import EffortConfig, PruneConfig, key_dump
from core.data.dataset import RecDataset
from core.effort.prompts import PromptTemplate
from core.stages.base import RunConfig, StageContext, StageOutput

log = logging.getLogger(__name__)


def surrogate_key(ds: RecDataset, cfg: PruneConfig) -> str:
    return cache_key("surrogate", data=ds.fingerprint, cfg=key_dump(cfg.surrogate), seed=cfg.seed)


def influence_key(ds: RecDataset, cfg: PruneConfig) -> str:
    return cache_key("influence", surrogate=surrogate_key(ds, cfg), cfg=key_dump(cfg.influence), seed=cfg.seed)


def effort_precision(cfg: EffortConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device.type == "cuda" else "fp32"


def effort_key(ds: RecDataset, cfg: EffortConfig, llm_key: str, precision: str, template: PromptTemplate) -> str:
    # Batch size, device and prefix caching do not change the scores (beyond float rounding), and the
    # length correction is applied to the cached raw scores afterwards: not in the key.
    relevant = key_dump(cfg, exclude={"device", "max_batch_tokens", "cache_prefix", "precision", "llm", "gguf_file",
                                      "processes", "length_correction"})
    return cache_key("effort", data=ds.fingerprint, cfg=relevant, llm=llm_key, precision=precision,
                     template=template.model_dump())


def surrogate_stage(ds, cfg, dev, cache_dir, progress=None, cancel=None, use_cache=True):
    """(model, training report, checkpoint path, reused from the cache): trained, or loaded."""
    from core.surrogate.train import load_checkpoint, save_checkpoint, train_surrogate

    path = cache_dir / surrogate_key(ds, cfg) / "surrogate.pt"
    if use_cache and path.is_file():
        try:
            model, extra = load_checkpoint(path, device=dev)
            log.info("surrogate: reusing the cached model %s", path.parent.name)
            if progress:
                progress(1.0, "reused cached surrogate")
            return model, json.loads(extra.get("report_json", "null")), path, True
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            log.warning("surrogate cache %s unreadable (%s): retraining", path, exc)
    torch.manual_seed(cfg.seed)
    model, report = train_surrogate(ds, cfg.surrogate, cfg.seed, device=dev, progress=progress, cancel=cancel)
    if use_cache:
        save_checkpoint(model, path, {"report_json": json.dumps(report, default=float), "fingerprint": ds.fingerprint})
    return model, report, path, False


SCORE_ARRAYS = ("influence", "grand", "el2n")


def influence_stage(model, ds, cfg, dev, cache_dir, progress=None, cancel=None,
                    use_cache=True) -> tuple[dict[str, np.ndarray], Path, bool]:
    """({influence, grand, el2n} per sample, path of their .npz, reused from the cache) from the
    trained surrogate."""
    from core.influence import influence_scores

    path = cache_dir / influence_key(ds, cfg) / "scores.npz"
    cached = load_arrays(path) if use_cache else None
    if cached is not None and all(k in cached for k in SCORE_ARRAYS):
        log.info("influence: reusing cached scores %s", path.parent.name)
        if progress:
            progress(1.0, "reused cached influence scores")
        return {k: cached[k] for k in SCORE_ARRAYS}, path, True
    out = influence_scores(model, ds, cfg.influence, cfg.seed, device=dev, progress=progress, cancel=cancel)
    arrays = {k: np.asarray(out[k], dtype=np.float64) for k in SCORE_ARRAYS}
    if use_cache:
        save_arrays(path, **arrays)
    return arrays, path, False


def effort_settings(cfg: EffortConfig, dev: torch.device, precision: str):
    from core.effort.score import EffortSettings

    # CPU: small batches (the logits dominate memory and batching barely pays); GPU: large ones.
    max_tokens = cfg.max_batch_tokens or (16384 if dev.type == "cuda" else 256)
    return EffortSettings(cache_prefix=cfg.cache_prefix, max_batch_tokens=max_tokens, precision=precision,
                          loss=cfg.loss, logits_chunk=8192 if dev.type == "cuda" else 256)


# Below this many samples, starting processes and loading a model in each costs more than it saves.
MIN_SAMPLES_PER_PROCESS = 128


def cpu_processes(cfg: EffortConfig, dev: torch.device, n_samples: int) -> tuple[int, int]:
    """(processes, torch threads each) for the effort stage. GPU: one process. CPU: one single-thread
    process per core the run may use (torch's thread count), when the work is large enough."""
    threads = torch.get_num_threads()
    if dev.type != "cpu":
        return 1, threads
    wanted = cfg.processes or threads
    processes = max(1, min(wanted, n_samples // MIN_SAMPLES_PER_PROCESS))
    return processes, max(1, threads // processes)


def effort_stage(ds, cfg: EffortConfig, dev, cache_dir, template, progress=None, cancel=None,
                 use_cache=True) -> tuple[np.ndarray, dict, Path, np.ndarray]:
    """(raw effort per sample, how it was computed, path of its .npz, prompt tokens per sample);
    `info["cached"]` says whether it was reused. The .npz holds `effort` and `prompt_tokens` (an entry
    from before the tokens were kept gets them added)."""
    from core.effort.llm import attach_lora, ensure_llm_cached, load_base_model, load_tokenizer, resolve_llm
    from core.effort.parallel import score_in_processes
    from core.effort.prompts import tokenize_samples
    from core.effort.score import EffortScorer, find_target

    source = resolve_llm(cfg.llm, cfg.gguf_file)
    precision = effort_precision(cfg, dev)
    path = cache_dir / effort_key(ds, cfg, source.key(), precision, template) / "effort.npz"
    info = {"llm": str(source.folder / (source.gguf_file or "")), "precision": precision, "device": dev.type,
            "loss": cfg.loss}
    cached = load_arrays(path) if use_cache else None
    if cached is not None and "effort" in cached and len(cached["effort"]) == ds.n_users:
        log.info("effort: reusing cached scores %s", path.parent.name)
        tokens = cached.get("prompt_tokens")
        if tokens is None or len(tokens) != ds.n_users:
            tokens = prompt_token_counts(ds, cfg, cache_dir, template)
            save_arrays(path, effort=cached["effort"], prompt_tokens=tokens)
        if progress:
            progress(1.0, "reused cached effort scores")
        return cached["effort"], {**info, "cached": True}, path, tokens
    if progress:
        progress(0.0, "loading the LLM")
    settings = effort_settings(cfg, dev, precision)
    processes, threads = cpu_processes(cfg, dev, ds.n_users)
    t0 = time.perf_counter()
    if processes > 1:
        ensure_llm_cached(source, cache_dir)
        tokenizer = load_tokenizer(source, cache_dir)
        samples = tokenize_samples(ds, list(range(ds.n_users)), tokenizer, cfg.cutoff_len, template)
        effort = score_in_processes(cfg, cache_dir, settings, samples, tokenizer.eos_token_id, processes,
                                    threads, progress=progress, cancel=cancel)
    else:
        model, tokenizer = load_base_model(source, cache_dir)
        model = attach_lora(model, cfg).to(dev)
        target = find_target(model, cfg.target_module, cfg.target_layer)
        samples = tokenize_samples(ds, list(range(ds.n_users)), tokenizer, cfg.cutoff_len, template)
        scorer = EffortScorer(model, target, settings, dev, tokenizer.eos_token_id)
        effort = scorer.score(samples, progress=progress, cancel=cancel)
    tokens = np.array([len(s.ids) for s in samples], dtype=np.int64)
    per_sample = (time.perf_counter() - t0) / max(ds.n_users, 1)
    info.update(seconds_per_sample=per_sample, mean_tokens=float(tokens.mean()) if tokens.size else 0.0,
                processes=processes)
    if use_cache:
        save_arrays(path, effort=effort, prompt_tokens=tokens)
    return effort, info, path, tokens


def prompt_token_counts(ds: RecDataset, cfg: EffortConfig, cache_dir: Path | None = None,
                        template: PromptTemplate | None = None) -> np.ndarray:
    """Each sample's prompt length in tokens of the configured LLM, cut to `cutoff_len` as the effort
    stage and `bigrec_train.jsonl` cut it (only the tokenizer is loaded)."""
    from core.effort.llm import load_tokenizer, resolve_llm
    from core.effort.prompts import tokenize_samples

    tokenizer = load_tokenizer(resolve_llm(cfg.llm, cfg.gguf_file),
                               Path(cache_dir) if cache_dir else default_cache_dir())
    samples = tokenize_samples(ds, list(range(ds.n_users)), tokenizer, cfg.cutoff_len, template or PromptTemplate())
    return np.array([len(s.ids) for s in samples], dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Behind the stage protocol


def run_surrogate(ds: RecDataset, cfg: RunConfig, ctx: StageContext) -> StageOutput:
    model, report, path, cached = surrogate_stage(ds, cfg.prune, ctx.device, ctx.cache_dir, ctx.reporter("surrogate"),
                                                  ctx.cancel, ctx.use_cache)
    ctx.state["surrogate"], ctx.state["surrogate_report"] = model, report
    return StageOutput(path, cached)


def trained_surrogate(ds: RecDataset, cfg: RunConfig, ctx: StageContext):
    """The surrogate a "surrogate" stage trained: from this process, else its checkpoint."""
    if "surrogate" not in ctx.state:
        model, report, _, _ = surrogate_stage(ds, cfg.prune, ctx.device, ctx.cache_dir, None, ctx.cancel)
        ctx.state["surrogate"], ctx.state["surrogate_report"] = model, report
    return ctx.state["surrogate"]


def run_influence(ds: RecDataset, cfg: RunConfig, ctx: StageContext) -> StageOutput:
    model = trained_surrogate(ds, cfg, ctx)
    arrays, path, cached = influence_stage(model, ds, cfg.prune, ctx.device, ctx.cache_dir, ctx.reporter("influence"),
                                           ctx.cancel, ctx.use_cache)
    ctx.scores.update(arrays)
    return StageOutput(path, cached)


def run_effort(ds: RecDataset, cfg: RunConfig, ctx: StageContext) -> StageOutput:
    effort, info, path, tokens = effort_stage(ds, cfg.prune.effort, ctx.device, ctx.cache_dir, ctx.template,
                                              ctx.reporter("effort"), ctx.cancel, ctx.use_cache)
    ctx.scores["effort"], ctx.scores["prompt_tokens"] = effort, tokens
    ctx.state["effort_info"] = info
    return StageOutput(path, bool(info.get("cached")))
