"""Resumable LoRA fine-tuning: the whole training-loop state, written every few minutes.

A fine-tune of 1,024 samples on these CPUs takes an hour or more, longer than some sessions or worker
leases last. `train_lora(..., checkpoint=PATH)` writes this file after an optimizer step whenever
`every_s` seconds have passed since the last write, and at the end of each epoch; a later call with
the same path, configuration and samples continues where it stopped. The resumed run is the run that
was not interrupted, bit for bit on the same machine: the checkpoint holds the trainable weights, the
optimizer's moments, torch's RNG (dropout), the epoch's shuffle (the numpy generator's state at the
epoch's start plus how many effective batches were done) and the running loss sums, early-stopping
bookkeeping and the best state so far.

A checkpoint belongs to one (configuration, training samples, validation samples) triple: its
`fingerprint` says which, and one that does not match is ignored (with a log line), never applied.
It also records a digest of the frozen base weights (`base`): the configuration names the LLM by the
string the caller gave, so other weights behind the same path would otherwise pass. Checkpoints
written before `base` was recorded have none and are matched on the fingerprint alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.cache import atomic_write_bytes
from core.config import FinetuneConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dealrec-finetune-checkpoint-v1"
DEFAULT_EVERY_S = 300.0


def training_fingerprint(cfg: FinetuneConfig, train: Sequence[Any], valid: Sequence[Any]) -> str:
    """What a checkpoint must match to be resumed: the recipe and the exact encoded samples."""
    h = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    for part in (train, valid):
        h.update(b"|")
        for s in part:
            h.update(json.dumps([s.loss_from, list(s.ids)]).encode())
    return h.hexdigest()[:24]


@dataclass
class LoopState:
    """Where the loop stands. `epoch` is the epoch in progress (or the next one, with
    `batches_done` 0); `epoch_rng` is the shuffle generator's state when that epoch began."""

    epoch: int = 1
    batches_done: int = 0
    epoch_rng: dict[str, Any] | None = None
    step: int = 0
    lr: float = 0.0
    epoch_loss: float = 0.0
    epoch_tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0
    stale: int = 0
    seconds: float = 0.0  # training time spent before this process (added to the result's)


def base_fingerprint(model) -> str:
    """The frozen weights' sampled digest (core.evaluate.journal.weights_fingerprint)."""
    from core.evaluate.journal import weights_fingerprint

    return weights_fingerprint(model, frozen_only=True)


def save_checkpoint(path: Path, fingerprint: str, state: LoopState, model, optimizer,
                    best_state: dict[str, torch.Tensor] | None, base: str | None = None) -> None:
    """Write the loop's state atomically (a reader never sees half a file)."""
    import io

    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    blob = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "base": base, "loop": json.dumps(asdict(state)),
            "trainable": trainable, "optimizer": optimizer.state_dict(), "best_state": best_state,
            "torch_rng": torch.get_rng_state()}
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: Path, fingerprint: str, model, optimizer,
                    base: str | None = None) -> tuple[LoopState, dict | None] | None:
    """Restore the model's trainable weights, the optimizer and torch's RNG from `path` and return the
    loop state and best state; None (nothing touched) when there is no usable checkpoint there (another
    fingerprint, or `base` weights other than those it recorded)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: start over rather than fail the run
        log.warning("finetune: ignoring unreadable checkpoint %s (%s)", path, exc)
        return None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        log.warning("finetune: ignoring %s: not a fine-tuning checkpoint", path)
        return None
    if blob.get("fingerprint") != fingerprint:
        log.warning("finetune: ignoring checkpoint %s: it belongs to another configuration or selection", path)
        return None
    if base is not None and blob.get("base") is not None and blob["base"] != base:
        log.warning("finetune: ignoring checkpoint %s: it was trained on other base weights", path)
        return None
    named = dict(model.named_parameters())
    trainable = blob["trainable"]
    if set(trainable) != {n for n, p in named.items() if p.requires_grad}:
        log.warning("finetune: ignoring checkpoint %s: its trainable parameters differ from the model's", path)
        return None
    with torch.no_grad():
        for n, value in trainable.items():
            named[n].copy_(value.to(named[n].device))
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])
    state = LoopState(**json.loads(blob["loop"]))
    log.info("finetune: resuming from %s at epoch %d, batch %d (step %d)", path, state.epoch, state.batches_done,
             state.step)
    return state, blob["best_state"]
