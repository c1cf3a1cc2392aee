"""The DEALRec pipeline as one function: load -> surrogate -> influence -> effort -> selection.

Each stage reports progress through a callback, honours a cancel callback, and reuses cached
artifacts. Nothing here prints: the CLI and the worker render progress their own way.
"""

from __future__ import annotations

import json
import logging
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core.cache import cache_key, default_cache_dir, load_arrays, save_arrays
from core.config import EffortConfig, PruneConfig, key_dump
from core.data.dataset import RecDataset
from core.effort.prompts import PromptTemplate
from core.selection import SelectionResult, required_scores, select

log = logging.getLogger(__name__)

STAGES = ("load", "surrogate", "influence", "effort", "selection")
# Rough share of a CPU run's time per stage, so that one fraction can describe the whole job.
STAGE_WEIGHTS = {"load": 0.01, "surrogate": 0.14, "influence": 0.05, "effort": 0.79, "selection": 0.01}

ProgressFn = Callable[[str, float, str], None]  # (stage, fraction of that stage, message)
CancelFn = Callable[[], bool]


@dataclass
class StageRecord:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0  # this process
    child_peak_rss_mb: float = 0.0  # the largest helper process the stage started (effort on CPU), if any
    cached: bool = False
    skipped: bool = False


@dataclass
class PruneResult:
    dataset: RecDataset
    config: PruneConfig
    selection: SelectionResult
    scores: dict[str, np.ndarray]
    stages: dict[str, StageRecord] = field(default_factory=dict)
    surrogate_report: dict | None = None
    effort_info: dict = field(default_factory=dict)
    diagnostics: dict | None = None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


class StageTimer:
    """Wall time and peak resident memory of one stage. The process-wide peak (ru_maxrss) never goes
    down, so a sampling thread measures the peak within the stage itself."""

    def __init__(self, stages: dict[str, StageRecord], name: str, interval: float = 0.05) -> None:
        self.rec = stages.setdefault(name, StageRecord())
        self.interval = interval

    def __enter__(self) -> StageRecord:
        self._children_before = _children_peak_mb()
        self._stop = threading.Event()
        self._peak = current_rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self.rec

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, current_rss_mb())

    def __exit__(self, *exc) -> None:
        self.rec.seconds += time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.rec.peak_rss_mb = max(self.rec.peak_rss_mb, self._peak, current_rss_mb())
        children = _children_peak_mb()
        if children > self._children_before:  # a child of this stage set a new high
            self.rec.child_peak_rss_mb = max(self.rec.child_peak_rss_mb, children)


def _children_peak_mb() -> float:
    """Peak RSS of the largest terminated child process so far (the OS keeps only the maximum)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return torch.device(device)


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


def run_prune(ds: RecDataset, cfg: PruneConfig, *, device: str = "auto", cache_dir: Path | None = None,
              template: PromptTemplate | None = None, progress: ProgressFn | None = None,
              cancel: CancelFn | None = None, use_cache: bool = True, with_diagnostics: bool = True) -> PruneResult:
    """Score and select. `ds` is already loaded (and limited). Returns the selection, all scores
    (the effort as the selection used it, its raw norms as `effort_raw` when corrected, and each
    sample's `prompt_tokens`) and, `with_diagnostics`, the selection's diagnostics."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    template = template or PromptTemplate()
    dev = resolve_device(device)
    stages: dict[str, StageRecord] = {}
    method = cfg.selection.method
    needed = required_scores(method)
    scores: dict[str, np.ndarray] = {}
    report = None

    def stage_progress(name: str):
        return (lambda frac, msg="": progress(name, frac, msg)) if progress else None

    if needed & {"influence", "grand", "el2n"}:
        model, report, _ = surrogate_stage(ds, cfg, dev, cache_dir, stages, stage_progress("surrogate"), cancel,
                                           use_cache)
        scores.update(influence_stage(model, ds, cfg, dev, cache_dir, stages, stage_progress("influence"), cancel,
                                      use_cache)[0])
    else:
        stages["surrogate"] = StageRecord(skipped=True)
        stages["influence"] = StageRecord(skipped=True)
    effort_info: dict = {}
    if "effort" in needed:
        scores["effort"], effort_info, _, scores["prompt_tokens"] = effort_stage(
            ds, cfg.effort, dev, cache_dir, template, stages, stage_progress("effort"), cancel, use_cache)
    else:
        stages["effort"] = StageRecord(skipped=True)

    result = selection_stage(ds, cfg, scores, stages, stage_progress("selection"))
    diagnostics = None
    if with_diagnostics:
        from core.diagnostics import selection_diagnostics

        if "prompt_tokens" not in scores:
            scores["prompt_tokens"] = prompt_token_counts(ds, cfg.effort, cache_dir, template)
        diagnostics = selection_diagnostics(ds, result, scores, scores["prompt_tokens"])
    return PruneResult(ds, cfg, result, scores, stages, report, effort_info, diagnostics)


# Each stage below writes its artifact to the cache (atomically) and returns its path with the result,
# so that a caller running the stages in separate processes (the service's workers) can hand the
# artifact of one stage to the next by path, whatever device or precision produced it.


def apply_effort_correction(scores: dict[str, np.ndarray], cfg: EffortConfig) -> None:
    """In place: with a length correction configured, `effort` becomes the corrected score the
    selection uses and `effort_raw` keeps the norms (applied to `effort_raw` when present, so calling
    this twice changes nothing)."""
    from core.effort.length import correct_effort

    if "effort" not in scores or cfg.length_correction == "none":
        return
    raw = scores.setdefault("effort_raw", scores["effort"])
    scores["effort"] = correct_effort(raw, scores.get("prompt_tokens"), cfg.length_correction)


def selection_stage(ds: RecDataset, cfg: PruneConfig, scores: dict[str, np.ndarray], stages: dict[str, StageRecord],
                    progress=None) -> SelectionResult:
    """Select from the scores (`scores` gets the corrected effort, see `apply_effort_correction`)."""
    apply_effort_correction(scores, cfg.effort)
    with StageTimer(stages, "selection"):
        result = select(cfg.selection.method, {k: v for k, v in scores.items() if k in required_scores(
            cfg.selection.method)}, cfg.selection, n_samples=ds.n_users)
    if progress:
        progress(1.0, f"selected {len(result.selected)} of {ds.n_users}")
    for note in result.notes:
        log.info("selection: %s", note)
    if len(result.selected) < cfg.selection.budget:
        log.warning("selected %d samples, fewer than the budget %d", len(result.selected), cfg.selection.budget)
    return result


def surrogate_stage(ds, cfg, dev, cache_dir, stages, progress=None, cancel=None, use_cache=True):
    """(model, training report, checkpoint path): trained, or loaded from the cache."""
    from core.surrogate.train import load_checkpoint, save_checkpoint, train_surrogate

    path = cache_dir / surrogate_key(ds, cfg) / "surrogate.pt"
    with StageTimer(stages, "surrogate") as rec:
        if use_cache and path.is_file():
            try:
                model, extra = load_checkpoint(path, device=dev)
                rec.cached = True
                log.info("surrogate: reusing the cached model %s", path.parent.name)
                if progress:
                    progress(1.0, "reused cached surrogate")
                return model, json.loads(extra.get("report_json", "null")), path
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                log.warning("surrogate cache %s unreadable (%s): retraining", path, exc)
        torch.manual_seed(cfg.seed)
        model, report = train_surrogate(ds, cfg.surrogate, cfg.seed, device=dev, progress=progress, cancel=cancel)
        if use_cache:
            save_checkpoint(model, path, {"report_json": json.dumps(report, default=float),
                                          "fingerprint": ds.fingerprint})
        return model, report, path


SCORE_ARRAYS = ("influence", "grand", "el2n")


def influence_stage(model, ds, cfg, dev, cache_dir, stages, progress=None, cancel=None,
                    use_cache=True) -> tuple[dict[str, np.ndarray], Path]:
    """({influence, grand, el2n} per sample, path of their .npz) from the trained surrogate."""
    from core.influence import influence_scores

    path = cache_dir / influence_key(ds, cfg) / "scores.npz"
    with StageTimer(stages, "influence") as rec:
        cached = load_arrays(path) if use_cache else None
        if cached is not None and all(k in cached for k in SCORE_ARRAYS):
            rec.cached = True
            log.info("influence: reusing cached scores %s", path.parent.name)
            if progress:
                progress(1.0, "reused cached influence scores")
            return {k: cached[k] for k in SCORE_ARRAYS}, path
        out = influence_scores(model, ds, cfg.influence, cfg.seed, device=dev, progress=progress, cancel=cancel)
        arrays = {k: np.asarray(out[k], dtype=np.float64) for k in SCORE_ARRAYS}
        if use_cache:
            save_arrays(path, **arrays)
        return arrays, path


def effort_settings(cfg: EffortConfig, dev: torch.device, precision: str):
    from core.effort.score import EffortSettings

    # CPU: small batches (the logits dominate memory and batching barely pays); GPU: large ones.
    max_tokens = cfg.max_batch_tokens or (16384 if dev.type == "cuda" else 256)
    return EffortSettings(cache_prefix=cfg.cache_prefix, max_batch_tokens=max_tokens, precision=precision, loss=cfg.loss,
                          logits_chunk=8192 if dev.type == "cuda" else 256)


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


def effort_stage(ds, cfg: EffortConfig, dev, cache_dir, template, stages, progress=None, cancel=None,
                 use_cache=True) -> tuple[np.ndarray, dict, Path, np.ndarray]:
    """(raw effort per sample, how it was computed, path of its .npz, prompt tokens per sample).
    The .npz holds `effort` and `prompt_tokens` (an entry from before the tokens were kept gets them
    added)."""
    from core.effort.llm import attach_lora, ensure_llm_cached, load_base_model, load_tokenizer, resolve_llm
    from core.effort.parallel import score_in_processes
    from core.effort.prompts import tokenize_samples
    from core.effort.score import EffortScorer, find_target

    with StageTimer(stages, "effort") as rec:
        source = resolve_llm(cfg.llm, cfg.gguf_file)
        precision = effort_precision(cfg, dev)
        path = cache_dir / effort_key(ds, cfg, source.key(), precision, template) / "effort.npz"
        info = {"llm": str(source.folder / (source.gguf_file or "")), "precision": precision, "device": dev.type,
                "loss": cfg.loss}
        cached = load_arrays(path) if use_cache else None
        if cached is not None and "effort" in cached and len(cached["effort"]) == ds.n_users:
            rec.cached = True
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

    tokenizer = load_tokenizer(resolve_llm(cfg.llm, cfg.gguf_file), Path(cache_dir) if cache_dir else default_cache_dir())
    samples = tokenize_samples(ds, list(range(ds.n_users)), tokenizer, cfg.cutoff_len, template or PromptTemplate())
    return np.array([len(s.ids) for s in samples], dtype=np.int64)


def bigrec_records(ds: RecDataset, users, cfg: EffortConfig, cache_dir: Path | None = None,
                   template: PromptTemplate | None = None):
    """Instruction/input/output records of `users`, cut to `cutoff_len` tokens of the configured
    LLM's tokenizer exactly as the effort stage cuts them (only the tokenizer is loaded)."""
    from core.effort.llm import load_tokenizer, resolve_llm
    from core.effort.prompts import make_record, tokenize_samples

    template = template or PromptTemplate()
    tokenizer = load_tokenizer(resolve_llm(cfg.llm, cfg.gguf_file), Path(cache_dir) if cache_dir else default_cache_dir())
    users = [int(u) for u in users]
    cut = tokenize_samples(ds, users, tokenizer, cfg.cutoff_len, template)
    return [make_record(ds, u, template, s.kept) for u, s in zip(users, cut)]
