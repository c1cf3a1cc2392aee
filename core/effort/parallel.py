"""Effort scoring over several CPU processes.

On a CPU, torch's intra-op threads parallelise a small-batch forward poorly: two processes at one
thread each score more samples per second than one process at two threads (measured: ~1.2x on
2 cores). Each process loads its own copy of the (cached, de-quantised) model with the same seeded
LoRA, so the scores are identical to a single process's; samples are dealt out in length order so
that the shards take the same time.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from core.config import EffortConfig
from core.effort.prompts import TokenizedSample
from core.effort.score import EffortCancelled, EffortSettings

log = logging.getLogger(__name__)

PROGRESS_UNITS = 10_000  # a process reports its progress in these units of its own work


def _worker(rank: int, cfg: EffortConfig, cache_dir: str, settings: EffortSettings, threads: int,
            shard: list[TokenizedSample], eos_id: int, events: mp.Queue, stop: mp.Event,
            store: tuple[str, str, list[bytes]] | None = None) -> None:
    torch.set_num_threads(threads)
    from core.effort.llm import attach_lora, load_base_model, resolve_llm
    from core.effort.score import EffortScorer, find_target
    from core.effort.store import BufferedInsert, ScoreStore

    try:
        model, _ = load_base_model(resolve_llm(cfg.llm, cfg.gguf_file), Path(cache_dir))
        model = attach_lora(model, cfg)
        scorer = EffortScorer(model, find_target(model, cfg.target_module, cfg.target_layer), settings,
                              torch.device("cpu"), eos_id)
        done = [0]

        def progress(frac: float, _msg: str) -> None:
            n = int(round(frac * PROGRESS_UNITS))  # the shard's fraction of its tokens, in units
            events.put(("progress", rank, n - done[0]))
            done[0] = n

        sink = None
        if store is not None:  # each process stores its own batches: a killed run keeps what it scored
            root, key, keys = store
            sink = BufferedInsert(ScoreStore(Path(root), key), keys)
        try:
            norms = scorer.score(shard, progress=progress, cancel=stop.is_set, sink=sink)
        finally:
            if sink is not None:
                sink.flush()
        events.put(("result", rank, norms))
    except EffortCancelled:
        events.put(("cancelled", rank, None))
    except BaseException as exc:  # reported to the parent, which raises it there
        events.put(("error", rank, f"{type(exc).__name__}: {exc}"))


def score_in_processes(cfg: EffortConfig, cache_dir: Path, settings: EffortSettings,
                       samples: Sequence[TokenizedSample], eos_id: int, processes: int, threads: int,
                       progress: Callable[[float, str], None] | None = None,
                       cancel: Callable[[], bool] | None = None,
                       store: tuple[Path, str, Sequence[bytes]] | None = None) -> np.ndarray:
    """Effort of every sample, in the order given, computed by `processes` spawned workers.
    `store` = (root, config key, each sample's store key): the workers insert their scores into
    that per-sample store as they go."""
    order = np.argsort([len(s.ids) for s in samples], kind="stable")
    shards_idx = [order[r::processes] for r in range(processes)]
    ctx = mp.get_context("spawn")  # never fork a process that holds torch's thread pools
    events, stop = ctx.Queue(), ctx.Event()

    def store_of(idx: np.ndarray):
        return None if store is None else (str(store[0]), store[1], [store[2][i] for i in idx])

    procs = [ctx.Process(target=_worker, args=(r, cfg, str(cache_dir), settings, threads, [samples[i] for i in idx],
                                               eos_id, events, stop, store_of(idx)), daemon=True)
             for r, idx in enumerate(shards_idx)]
    for p in procs:
        p.start()
    out = np.zeros(len(samples), dtype=np.float64)
    pending, done, failure = set(range(processes)), 0, None
    total = PROGRESS_UNITS * processes
    try:
        while pending:
            if cancel is not None and cancel():
                stop.set()
            try:
                kind, rank, payload = events.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r in pending if not procs[r].is_alive() and procs[r].exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"effort worker {dead[0]} died (exit code {procs[dead[0]].exitcode})") from None
                continue
            if kind == "progress":
                # Each process reports its own share of tokens; shards are balanced by length.
                done += payload
                if progress is not None:
                    progress(done / total, f"effort {done / total:.0%}")
            elif kind == "result":
                out[shards_idx[rank]] = payload
                pending.discard(rank)
            elif kind == "cancelled":
                pending.discard(rank)
                failure = failure or EffortCancelled()
            else:
                stop.set()
                pending.discard(rank)
                failure = RuntimeError(f"effort worker {rank} failed: {payload}")
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if failure is not None:
        raise failure
    return out
