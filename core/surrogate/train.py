"""Training the SASRec surrogate with early stopping, full-ranking evaluation, and checkpoints.

Departures from the reference (see DEALREC.md): the best validation state is kept (the reference
overwrites its checkpoint at every evaluation), negatives and shuffling are seeded, and seen items
are excluded from the ranking with -inf rather than 0.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from core.config import SurrogateConfig
from core.data.dataset import RecDataset
from core.surrogate.batches import batch_loss, make_batch, sample_negatives
from core.surrogate.metrics import DEFAULT_KS, recall_ndcg_at_k, topk_excluding
from core.surrogate.model import SASRec

logger = logging.getLogger(__name__)

CRITERION = "recall@20"
CHECKPOINT_FORMAT = "dealrec-surrogate-v1"


class Cancelled(Exception):
    """Raised by `train_surrogate` when its `cancel()` callback returns True."""


# ----------------------------------------------------------------------------------------------
# Evaluation


def _eval_lines(ds: RecDataset, u: int, split: Literal["valid", "test"]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input line, truth) of one user for a split: valid ranks after train, test after train + valid."""
    if split == "valid":
        return ds.train[u], ds.valid[u]
    if split == "test":
        return ds.train[u] + ds.valid[u], ds.test[u]
    raise ValueError(f"split must be 'valid' or 'test', got {split!r}")


def _left_pad(lines: Sequence[Sequence[int]], max_len: int) -> torch.Tensor:
    """(len(lines), max_len) int64, each line's last `max_len` items right-aligned, 0-padded on the left
    (the last position then always holds the most recent item, whose hidden state is the user's)."""
    out = np.zeros((len(lines), max_len), dtype=np.int64)
    for r, line in enumerate(lines):
        tail = line[-max_len:]
        if tail:
            out[r, max_len - len(tail):] = tail
    return torch.from_numpy(out)


@torch.no_grad()
def evaluate(model: SASRec, ds: RecDataset, split: Literal["valid", "test"], ks: Sequence[int] = DEFAULT_KS,
             batch_size: int = 1024, device: torch.device | str = "cpu",
             users: Sequence[int] | None = None) -> dict[str, Any]:
    """Full-ranking Recall@K / NDCG@K on `split` over all items, seen items excluded.

    Only users (of `users`, default all) with a non-empty truth and a non-empty input count; the result
    has "recall@K", "ndcg@K" for each K and "users" (how many counted). The model's train/eval mode
    is restored afterwards.
    """
    pool = range(ds.n_users) if users is None else users
    chosen: list[int] = []
    for u in pool:
        line, truth = _eval_lines(ds, int(u), split)
        if line and truth:
            chosen.append(int(u))
    max_k = max(ks)
    was_training = model.training
    model.eval()
    ranked_parts: list[np.ndarray] = []
    truths: list[tuple[int, ...]] = []
    try:
        for start in range(0, len(chosen), batch_size):
            part = chosen[start:start + batch_size]
            pairs = [_eval_lines(ds, u, split) for u in part]
            seqs = _left_pad([p[0] for p in pairs], model.cfg.max_seq_length).to(device)
            hidden = model(seqs)[:, -1, :]
            # Exclude the whole seen line, not only the last max_len items fed to the model.
            ranked_parts.append(topk_excluding(model.score_all(hidden), [p[0] for p in pairs], max_k))
            truths.extend(p[1] for p in pairs)
    finally:
        model.train(was_training)
    ranked = np.concatenate(ranked_parts) if ranked_parts else np.zeros((0, max_k), dtype=np.int64)
    result: dict[str, Any] = recall_ndcg_at_k(ranked, truths, ks)
    result["users"] = len(chosen)
    return result


# ----------------------------------------------------------------------------------------------
# Training


def _trainable_users(ds: RecDataset, users: Sequence[int] | None) -> np.ndarray:
    """Users with at least one transition (a line of >= 2 items); the rest contribute no loss term."""
    pool = range(ds.n_users) if users is None else users
    return np.asarray([int(u) for u in pool if len(ds.train[int(u)]) >= 2], dtype=np.int64)


BUCKET_BATCHES = 16


def _epoch_batches(ds: RecDataset, users: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches, bucketed by length: users are shuffled, each run of BUCKET_BATCHES batches is
    sorted by line length and cut into batches, and the batch order is shuffled. Batches stay random
    draws of the data, but most are far narrower than the 50-item window, so an epoch costs a
    fraction of the fully padded one (SASRec's cost is in the padded width)."""
    order = users[rng.permutation(len(users))]
    lengths = np.fromiter((len(ds.train[u]) for u in order), dtype=np.int64, count=len(order))
    span = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), span):
        chunk = order[start:start + span][np.argsort(lengths[start:start + span], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def _train_epoch(model: SASRec, ds: RecDataset, users: np.ndarray, cfg: SurrogateConfig,
                 opt: torch.optim.Optimizer, rng: np.random.Generator, device: torch.device | str,
                 cancel: Callable[[], bool] | None) -> float:
    """One pass over `users` in shuffled batches with fresh negatives; returns the mean batch loss."""
    model.train()
    total, n_batches = 0.0, 0
    for part in _epoch_batches(ds, users, cfg.batch_size, rng):
        if cancel is not None and cancel():
            raise Cancelled("surrogate training cancelled")
        # New negatives for every batch of every epoch (the reference draws them in __getitem__).
        negs = sample_negatives(ds, part, cfg.max_seq_length, rng)
        batch = make_batch(ds, part, cfg.max_seq_length, negs, trim=True).to(device)
        loss = batch_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
        n_batches += 1
    return total / max(n_batches, 1)


def train_surrogate(ds: RecDataset, cfg: SurrogateConfig, seed: int, device: torch.device | str = "cpu",
                    progress: Callable[[float, str], None] | None = None,
                    cancel: Callable[[], bool] | None = None,
                    train_users: Sequence[int] | None = None,
                    init_state: dict[str, torch.Tensor] | None = None,
                    init_optimizer: dict[str, Any] | None = None) -> tuple[SASRec, dict[str, Any]]:
    """(model, report) of `train_surrogate_state`, without the optimiser state."""
    model, report, _ = train_surrogate_state(ds, cfg, seed, device, progress, cancel, train_users, init_state,
                                             init_optimizer)
    return model, report


def train_surrogate_state(ds: RecDataset, cfg: SurrogateConfig, seed: int, device: torch.device | str = "cpu",
                          progress: Callable[[float, str], None] | None = None,
                          cancel: Callable[[], bool] | None = None,
                          train_users: Sequence[int] | None = None,
                          init_state: dict[str, torch.Tensor] | None = None,
                          init_optimizer: dict[str, Any] | None = None
                          ) -> tuple[SASRec, dict[str, Any], dict[str, Any]]:
    """Train SASRec on the users' training lines; keep the state with the best validation Recall@20.

    Evaluates on valid every `cfg.eval_every` epochs (and after the last epoch), stops after
    `cfg.patience` evaluations without a strictly better Recall@20, restores the best state.
    `train_users` restricts training and validation to a subset; the test metrics in the report are
    always over all users (so subset-trained surrogates compare on the same test set).
    `init_state` warm-starts from an earlier model of the same shape (a previous version of the
    data): its weights are loaded before the first epoch, its item embeddings for the items it knew
    (items are appended, so item i keeps its row); the loaded model is evaluated before the first
    epoch and is the best state until an epoch beats it; early stopping then ends training as usual.
    `init_optimizer`: the Adam state saved with that earlier model (`load_warm_start`), so that the
    continued training takes the small steps the converged run was taking rather than a fresh
    Adam's first steps, which move every weight by about the learning rate whatever its gradient.
    Deterministic on CPU for a given (ds, cfg, seed). Raises `Cancelled` when `cancel()` is True.

    Returns (model in eval mode, report, Adam state of the best epoch) with report keys: best_epoch,
    epochs_run, stopped_early, valid (metrics at the best epoch), test (metrics of the restored
    model), train_seconds, train_users, history (one entry per evaluation), warm_start, and for a
    warm start optimizer_carried.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SASRec(ds.n_items, cfg).to(device)
    if init_state is not None:
        warm_start(model, init_state)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    if init_state is not None and init_optimizer is not None:
        _load_optimizer(opt, model, init_optimizer, cfg.lr)
    users = _trainable_users(ds, train_users)
    if len(users) == 0:
        raise ValueError("no training user has a line of at least 2 items")
    logger.info("surrogate: %d training users, %d items, up to %d epochs", len(users), ds.n_items, cfg.epochs)

    best_score = -math.inf
    best_epoch = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_opt: dict[str, Any] | None = None
    best_valid: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    stale = 0
    epoch = 0
    stopped_early = False
    t0 = time.perf_counter()
    if init_state is not None:
        # A warm start begins from a trained model: it is the first candidate for the best state, so
        # that the first epochs of a fresh optimiser (Adam's early steps are large) cannot leave a
        # model worse on validation than the one it started from.
        valid = evaluate(model, ds, "valid", device=device, users=train_users)
        history.append({"epoch": 0, "loss": None, **valid})
        if valid["users"] > 0:
            best_score, best_valid = valid[CRITERION], valid
            best_state = copy.deepcopy(model.state_dict())
            best_opt = copy.deepcopy(opt.state_dict())
        logger.info("surrogate: warm start (%s), epoch 0 valid %s %.4f",
                    "Adam state carried over" if init_optimizer is not None else "fresh Adam", CRITERION,
                    valid[CRITERION])
    for epoch in range(1, cfg.epochs + 1):
        loss = _train_epoch(model, ds, users, cfg, opt, rng, device, cancel)
        message = f"epoch {epoch}/{cfg.epochs} loss {loss:.4f}"
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            valid = evaluate(model, ds, "valid", device=device, users=train_users)
            history.append({"epoch": epoch, "loss": loss, **valid})
            # Without validation users there is no criterion: keep the latest state.
            if valid["users"] == 0 or valid[CRITERION] > best_score:
                best_score = valid[CRITERION]
                best_epoch, best_valid, stale = epoch, valid, 0
                best_state = copy.deepcopy(model.state_dict())
                best_opt = copy.deepcopy(opt.state_dict())
            else:
                stale += 1
            message += f" valid {CRITERION} {valid[CRITERION]:.4f} (best {best_score:.4f} @ {best_epoch})"
            if stale >= cfg.patience:
                stopped_early = True
        logger.info("surrogate: %s", message)
        if progress is not None:
            progress(1.0 if stopped_early else epoch / cfg.epochs, message)
        if stopped_early:
            logger.info("surrogate: early stop after %d evaluations without improvement", stale)
            break
    train_seconds = time.perf_counter() - t0

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    test = evaluate(model, ds, "test", device=device)
    report = {
        "best_epoch": best_epoch,
        "epochs_run": epoch,
        "stopped_early": stopped_early,
        "valid": best_valid,
        "test": test,
        "train_seconds": train_seconds,
        "train_users": int(len(users)),
        "history": history,
        "warm_start": init_state is not None,
    }
    if init_state is not None:
        report["optimizer_carried"] = init_optimizer is not None
    logger.info("surrogate: best epoch %d, valid %s %.4f, test %s %.4f, %.1f s", best_epoch, CRITERION,
                best_valid.get(CRITERION, float("nan")), CRITERION, test.get(CRITERION, float("nan")),
                train_seconds)
    return model, report, best_opt if best_opt is not None else opt.state_dict()


def _load_optimizer(opt: torch.optim.Optimizer, model: SASRec, state: dict[str, Any], lr: float) -> None:
    """Load an earlier run's Adam state into `opt`. A grown item table gets zero moments for its new
    rows (they have had no updates yet); the learning rate stays this run's."""
    state = copy.deepcopy(state)
    saved = state.get("state", {})
    # The optimiser's state is indexed by position in model.parameters(), named_parameters' order.
    for index, (name, param) in enumerate(model.named_parameters()):
        entry = saved.get(index, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            value = entry.get(moment)
            if value is None or value.shape == param.shape:
                continue
            grows = value.shape[1:] == param.shape[1:] and value.shape[0] <= param.shape[0]
            if name != "item_embeddings.weight" or not grows:
                raise ValueError(f"warm start: the saved Adam state of '{name}' is {tuple(value.shape)}, "
                                 f"the weight {tuple(param.shape)}")
            grown = torch.zeros_like(param.detach())
            grown[:value.shape[0]] = value
            entry[moment] = grown
    opt.load_state_dict(state)
    for group in opt.param_groups:
        group["lr"] = lr


def warm_start(model: SASRec, state: dict[str, torch.Tensor]) -> None:
    """Load an earlier model's weights into `model`: every tensor of the same shape as is, and the
    rows of the item embedding table the earlier model had (a grown catalogue keeps the new rows'
    fresh, seeded initialisation). A tensor of another shape (other hyper-parameters) is an error."""
    own = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            if name not in own:
                raise ValueError(f"warm start: the earlier surrogate has a weight '{name}' this one lacks")
            target = own[name]
            if target.shape == value.shape:
                target.copy_(value)
            elif name == "item_embeddings.weight" and value.shape[1:] == target.shape[1:] \
                    and value.shape[0] <= target.shape[0]:
                target[:value.shape[0]].copy_(value)
            else:
                raise ValueError(f"warm start: '{name}' is {tuple(value.shape)} in the earlier surrogate, "
                                 f"{tuple(target.shape)} here")


# ----------------------------------------------------------------------------------------------
# Checkpoints

_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj: Any, where: str = "extra") -> None:
    """Reject anything `torch.load(weights_only=True)` would refuse (numpy scalars, custom classes),
    at save time rather than when someone later tries to load the file."""
    if isinstance(obj, (_PLAIN, torch.Tensor)):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, _PLAIN):
                raise TypeError(f"{where}: key {key!r} is not a plain type")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a weights-only checkpoint")


def save_checkpoint(model: SASRec, path: str | os.PathLike[str], extra: dict[str, Any],
                    optimizer: dict[str, Any] | None = None) -> None:
    """Write state_dict, cfg, n_items, `extra` (plain types / tensors only) and the optimiser's state
    (what a warm start of a later version continues from) to `path` atomically: a temporary file in
    the same folder, then os.replace, so a reader never sees a partial file."""
    _check_plain(extra)
    if optimizer is not None:
        _check_plain(optimizer, "optimizer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "cfg": model.cfg.model_dump(),
        "n_items": int(model.n_items),
        "extra": extra,
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu",
                     mmap: bool = False) -> dict[str, Any]:
    """The payload `save_checkpoint` wrote (`mmap`: tensors mapped, not read), or ValueError."""
    payload = torch.load(Path(path), map_location=device, weights_only=True, mmap=mmap)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a surrogate checkpoint ({CHECKPOINT_FORMAT})")
    return payload


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> tuple[SASRec, dict[str, Any]]:
    """The model (eval mode, on `device`) and the `extra` dict saved with it."""
    payload = _read_checkpoint(path, device)
    cfg = SurrogateConfig(**payload["cfg"])
    model = SASRec(int(payload["n_items"]), cfg)
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    return model, payload["extra"]


def load_warm_start(path: str | os.PathLike[str], device: torch.device | str = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(weights, Adam state or None) of a checkpoint to warm-start from; checkpoints written before
    the optimiser state was saved have none (a warm start from them uses a fresh Adam)."""
    payload = _read_checkpoint(path, device)
    return payload["state_dict"], payload.get("optimizer")


def has_optimizer_state(path: str | os.PathLike[str]) -> bool:
    """Whether a checkpoint carries the Adam state (memory-mapped: the tensors are not read)."""
    return _read_checkpoint(path, mmap=True).get("optimizer") is not None
