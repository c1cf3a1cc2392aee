"""The effort stage: each sample's effort score from the LLM, looked up in the per-sample store
(core/effort/store.py) where the same prompt was scored before with the same settings, computed for
the others (one process per core on the CPU, batched on a GPU) and stored as it is computed.

`effort_pool` says which samples of a pool (or of a shard of it) still need scoring; `effort_stage`
is the stage with explicit arguments; `run_effort` the same behind the stage protocol."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.cache import cache_key, default_cache_dir, load_arrays, save_arrays
from core.config import EffortConfig, key_dump
from core.data.dataset import RecDataset
from core.effort.prompts import PromptTemplate
from core.progress import uninterruptible
from core.stages.base import RunConfig, StageContext, StageOutput

log = logging.getLogger(__name__)


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


def effort_settings(cfg: EffortConfig, dev: torch.device, precision: str, tokenizer=None,
                    template: PromptTemplate | None = None):
    """How the scorer batches and caches. The shared prefix is the template's own (when the
    tokenizer is given), so a sample's score does not depend on the pool it is scored in; on the
    CPU every sample is scored alone (batching does not pay there: the logits dominate), which makes
    its score independent of its batch as well."""
    from core.effort.prompts import template_prefix_tokens
    from core.effort.score import EffortSettings

    cpu = dev.type != "cuda"
    max_tokens = cfg.max_batch_tokens or (256 if cpu else 16384)
    prefix = template_prefix_tokens(tokenizer, template) if tokenizer is not None else None
    return EffortSettings(cache_prefix=cfg.cache_prefix, max_batch_tokens=max_tokens, precision=precision,
                          loss=cfg.loss, logits_chunk=256 if cpu else 8192, max_batch_size=1 if cpu else 64,
                          prefix_tokens=prefix)


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


def effort_store_key(cfg: EffortConfig, llm_key: str, precision: str, template: PromptTemplate) -> str:
    """What a per-sample effort score depends on besides its prompt: the effort key's parts without
    the dataset, and the adapter by its content (a path can hold another adapter later)."""
    from core.effort.store import file_digest

    relevant = key_dump(cfg, exclude={"device", "max_batch_tokens", "cache_prefix", "precision", "llm", "gguf_file",
                                      "processes", "length_correction", "adapter"})
    return cache_key("effort-store", cfg=relevant, llm=llm_key, adapter=file_digest(cfg.adapter),
                     precision=precision, template=template.model_dump())


@dataclass
class EffortPool:
    """The samples of a pool (or of a shard of one), their store keys and what the store holds for
    them (NaN where nothing)."""

    source: object  # core.effort.llm.LLMSource
    precision: str
    tokenizer: object
    users: list[int]
    samples: list  # TokenizedSample per user
    keys: list[bytes]
    store: object | None  # ScoreStore, None without the cache
    values: np.ndarray

    @property
    def missing(self) -> np.ndarray:
        return np.flatnonzero(np.isnan(self.values))

    @property
    def tokens(self) -> np.ndarray:
        return np.array([len(s.ids) for s in self.samples], dtype=np.int64)


def effort_pool(ds: RecDataset, cfg: EffortConfig, dev: torch.device, cache_dir: Path, template: PromptTemplate,
                users: Sequence[int] | None = None, use_cache: bool = True,
                store_root: Path | None = None) -> EffortPool:
    """Tokenise the users' prompts (every sample by default) and look their scores up in the store."""
    from core.effort.llm import load_tokenizer, resolve_llm
    from core.effort.prompts import tokenize_samples
    from core.effort.store import ScoreStore, sample_key

    source = resolve_llm(cfg.llm, cfg.gguf_file)
    precision = effort_precision(cfg, dev)
    tokenizer = load_tokenizer(source, cache_dir)
    users = list(range(ds.n_samples)) if users is None else [int(u) for u in users]
    samples = tokenize_samples(ds, users, tokenizer, cfg.cutoff_len, template)
    keys = [sample_key(s.ids) for s in samples]
    store = ScoreStore(Path(store_root or cache_dir), effort_store_key(cfg, source.key(), precision, template)) \
        if use_cache else None
    values = store.lookup(keys) if store is not None else np.full(len(samples), np.nan)
    return EffortPool(source, precision, tokenizer, users, samples, keys, store, values)


def fill_pool(pool: EffortPool, cfg: EffortConfig, dev: torch.device, cache_dir: Path, template: PromptTemplate,
              progress=None, cancel=None, model_cache: dict | None = None) -> tuple[int, int]:
    """Score the pool's missing samples into `pool.values` (and the store, batch by batch).
    Returns (samples scored, processes used)."""
    missing = pool.missing
    if not missing.size:
        return 0, 0
    if progress:
        progress(0.0, f"loading the LLM ({missing.size} of {len(pool.samples)} samples to score)")
    settings = effort_settings(cfg, dev, pool.precision, pool.tokenizer, template)
    values, processes = score_samples(cfg, pool.source, cache_dir, settings, [pool.samples[i] for i in missing],
                                      pool.tokenizer.eos_token_id, dev, pool.store, [pool.keys[i] for i in missing],
                                      progress, cancel, model_cache)
    pool.values[missing] = values
    return int(missing.size), processes


def effort_stage(ds, cfg: EffortConfig, dev, cache_dir, template, progress=None, cancel=None,
                 use_cache=True, store_root: Path | None = None) -> tuple[np.ndarray, dict, Path, np.ndarray]:
    """(raw effort per sample, how it was computed, path of its .npz, prompt tokens per sample).

    Scores come from the per-sample store (core/effort/store.py, under `store_root`, default the
    cache folder) where the same prompt was scored before with the same settings; only the others
    are computed, and stored as they are. `info` says how many were scored and how many came from
    the store (`cached` when the whole pool's .npz was there already). The .npz holds `effort` and
    `prompt_tokens` (an entry from before the tokens were kept gets them added)."""
    from core.effort.llm import resolve_llm

    source = resolve_llm(cfg.llm, cfg.gguf_file)
    precision = effort_precision(cfg, dev)
    path = cache_dir / effort_key(ds, cfg, source.key(), precision, template) / "effort.npz"
    info = {"llm": str(source.folder / (source.gguf_file or "")), "precision": precision, "device": dev.type,
            "loss": cfg.loss}
    cached = load_arrays(path) if use_cache else None
    if cached is not None and "effort" in cached and len(cached["effort"]) == ds.n_samples:
        log.info("effort: reusing cached scores %s", path.parent.name)
        tokens = cached.get("prompt_tokens")
        if tokens is None or len(tokens) != ds.n_samples:
            tokens = prompt_token_counts(ds, cfg, cache_dir, template)
            save_arrays(path, effort=cached["effort"], prompt_tokens=tokens)
        if progress:
            progress(1.0, "reused cached effort scores")
        return cached["effort"], {**info, "cached": True, "scored": 0, "from_store": ds.n_samples}, path, tokens
    pool = effort_pool(ds, cfg, dev, cache_dir, template, use_cache=use_cache, store_root=store_root)
    t0 = time.perf_counter()
    scored, processes = fill_pool(pool, cfg, dev, cache_dir, template, progress, cancel)
    if not scored and progress:
        progress(1.0, f"all {len(pool.samples)} effort scores from the store")
    tokens = pool.tokens
    info.update(seconds_per_sample=(time.perf_counter() - t0) / max(scored, 1),
                mean_tokens=float(tokens.mean()) if tokens.size else 0.0, processes=processes,
                scored=scored, from_store=len(pool.samples) - scored)
    log.info("effort: %d scored, %d from the store", scored, len(pool.samples) - scored)
    if use_cache:
        save_arrays(path, effort=pool.values, prompt_tokens=tokens)
    return pool.values, info, path, tokens


def score_samples(cfg: EffortConfig, source, cache_dir: Path, settings, samples, eos_id: int, dev: torch.device,
                  store, keys, progress=None, cancel=None, model_cache: dict | None = None) -> tuple[np.ndarray, int]:
    """(effort of `samples`, processes used): one process per core on the CPU when there are enough
    samples, else in this process (`model_cache`, a dict the caller keeps, holds the loaded LLM
    across calls: a service worker scores shard after shard); each batch goes into `store` (when
    given) as soon as it is scored."""
    from core.effort.parallel import score_in_processes
    from core.effort.store import BufferedInsert

    processes, threads = cpu_processes(cfg, dev, len(samples))
    if processes > 1:
        from core.effort.llm import ensure_llm_cached
        from core.effort.score import EffortCancelled

        with uninterruptible(cancel, EffortCancelled, "de-quantising the LLM"):
            ensure_llm_cached(source, cache_dir)
        where = None if store is None else (store.folder.parent.parent, store.folder.name, keys)
        return score_in_processes(cfg, cache_dir, settings, samples, eos_id, processes, threads, progress=progress,
                                  cancel=cancel, store=where), processes
    scorer = _scorer(cfg, source, cache_dir, dev, settings, eos_id, model_cache, cancel)
    sink = BufferedInsert(store, keys) if store is not None else None
    try:
        return scorer.score(samples, progress=progress, cancel=cancel, sink=sink), 1
    finally:
        if sink is not None:
            sink.flush()


def _scorer(cfg: EffortConfig, source, cache_dir: Path, dev: torch.device, settings, eos_id: int,
            model_cache: dict | None, cancel=None):
    """An EffortScorer over the LLM with its effort LoRA, kept in `model_cache` when given (one at a
    time: a worker's memory holds one LLM). The scorer, not just the model, is what is kept: in bf16
    it casts the frozen layers of its model once."""
    from core.effort.llm import attach_lora, load_base_model
    from core.effort.score import EffortCancelled, EffortScorer, find_target

    key = (source.key(), str(dev), settings, eos_id,
           cache_key("effort-model", cfg=key_dump(cfg, exclude={"device", "processes", "max_batch_tokens"})))
    if model_cache is not None and key in model_cache:
        return model_cache[key]
    with uninterruptible(cancel, EffortCancelled, "loading the LLM"):
        model, _ = load_base_model(source, cache_dir)
        model = attach_lora(model, cfg).to(dev)
        scorer = EffortScorer(model, find_target(model, cfg.target_module, cfg.target_layer), settings, dev, eos_id)
        if model_cache is not None:  # kept even if a cancel came meanwhile: the next shard needs it
            model_cache.clear()
            model_cache[key] = scorer
    return scorer


def prompt_token_counts(ds: RecDataset, cfg: EffortConfig, cache_dir: Path | None = None,
                        template: PromptTemplate | None = None) -> np.ndarray:
    """Each sample's prompt length in tokens of the configured LLM, cut to `cutoff_len` as the effort
    stage and `bigrec_train.jsonl` cut it (only the tokenizer is loaded)."""
    from core.effort.llm import load_tokenizer, resolve_llm
    from core.effort.prompts import tokenize_samples

    tokenizer = load_tokenizer(resolve_llm(cfg.llm, cfg.gguf_file),
                               Path(cache_dir) if cache_dir else default_cache_dir())
    samples = tokenize_samples(ds, list(range(ds.n_samples)), tokenizer, cfg.cutoff_len,
                               template or PromptTemplate())
    return np.array([len(s.ids) for s in samples], dtype=np.int64)



def plan_shards(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Positions 0..n-1 split into shards of about `max_tokens` prompt tokens each, balanced by
    tokens (the cost is linear in them): the longest first, each to the shard with the fewest
    tokens so far. Deterministic; every shard non-empty; positions sorted within a shard."""
    n = len(lengths)
    if n == 0:
        return []
    if max_tokens <= 0:
        return [list(range(n))]
    total = int(sum(lengths))
    k = max(1, min(n, -(-total // max_tokens)))
    shards: list[list[int]] = [[] for _ in range(k)]
    load = [0] * k
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        j = min(range(k), key=lambda j: (load[j], j))
        shards[j].append(i)
        load[j] += int(lengths[i])
    return [sorted(s) for s in shards]


# ----------------------------------------------------------------------------------------------
# Behind the stage protocol


def run_effort(ds: RecDataset, cfg: RunConfig, ctx: StageContext) -> StageOutput:
    effort, info, path, tokens = effort_stage(ds, cfg.prune.effort, ctx.device, ctx.cache_dir, ctx.template,
                                              ctx.reporter("effort"), ctx.cancel, ctx.use_cache, ctx.store_root)
    ctx.scores["effort"], ctx.scores["prompt_tokens"] = effort, tokens
    ctx.state["effort_info"] = info
    return StageOutput(path, bool(info.get("cached")))
