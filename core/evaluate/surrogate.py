"""Surrogate-level quality of a selection: train the SASRec surrogate on only the selected samples
and measure full-ranking Recall/NDCG on the test items of all users.

This is the paper's cheap proxy (DEALREC.md, "How quality is judged"): it needs no LLM fine-tuning,
so every pruning method can be compared with a random subset and with the full data in minutes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from core.config import SurrogateConfig
from core.data.dataset import RecDataset
from core.surrogate.train import train_surrogate

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


def _train_users(ds: RecDataset, selected: Sequence[int] | None) -> list[int] | None:
    """Sorted, de-duplicated sample indices, or None for all users. Sorted because the surrogate's
    seeded shuffle permutes positions: the same set in another order would train another model, and a
    selection is a set (methods return it in their own visiting order)."""
    if selected is None:
        return None
    users = sorted({int(u) for u in selected})
    if not users:
        raise ValueError("the selection is empty: nothing to train the surrogate on")
    if users[0] < 0 or users[-1] >= ds.n_samples:
        raise ValueError(f"selected sample indices must lie in [0, {ds.n_samples}), got {users[0]}..{users[-1]}")
    return users


def surrogate_level(ds: RecDataset, selected: Sequence[int] | None, cfg: SurrogateConfig, seed: int,
                    device: torch.device | str = "cpu", progress: ProgressFn | None = None,
                    cancel: CancelFn | None = None) -> dict[str, Any]:
    """Train the surrogate (`cfg`, `seed`) on the samples `selected` (indices into `ds`; None = all of
    them, the full-data reference) and return its test quality.

    Training and early stopping see only the selected users (their training lines and validation
    items), as a recommender fine-tuned on the subset would; the test metrics are over every user of
    `ds` with a test item, so subsets of any size compare on the same test set.

    Returns a JSON-ready dict:
      metrics      {"recall@K", "ndcg@K"} for K in 10, 20, 50 (test, full ranking, seen items excluded)
      test_users   users counted in the test metrics
      valid        validation metrics at the best epoch (over the selected users; {} without any)
      best_epoch, epochs_run, stopped_early
      selected     distinct samples given; train_users: those with at least one transition
      seconds      wall time of training plus evaluation
    No files are read or written; only torch's global RNG is reseeded (by `train_surrogate`).
    Deterministic on CPU for the same (ds, selection as a set, cfg, seed). Raises ValueError on an empty
    or out-of-range selection, core.surrogate.train.Cancelled when `cancel()` returns True.
    """
    users = _train_users(ds, selected)
    t0 = time.perf_counter()
    _, report = train_surrogate(ds, cfg, seed, device=device, progress=progress, cancel=cancel, train_users=users)
    return from_report(report, selected=ds.n_samples if users is None else len(users),
                       seconds=time.perf_counter() - t0)


def from_report(report: dict[str, Any], selected: int, seconds: float) -> dict[str, Any]:
    """The `surrogate_level` result from a `train_surrogate` report (also for a surrogate the pipeline
    trained and cached earlier: trained on all users with the same config and seed, it is the same
    model as the full-data reference)."""
    test = dict(report["test"])
    test_users = int(test.pop("users", 0))
    valid = {k: float(v) for k, v in (report.get("valid") or {}).items() if k != "users"}
    return {
        "metrics": {k: float(v) for k, v in test.items()},
        "test_users": test_users,
        "valid": valid,
        "best_epoch": int(report["best_epoch"]),
        "epochs_run": int(report["epochs_run"]),
        "stopped_early": bool(report["stopped_early"]),
        "selected": int(selected),
        "train_users": int(report["train_users"]),
        "seconds": float(seconds),
    }
