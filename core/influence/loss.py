"""The fixed per-sample loss l(z) (package docstring): which users are samples, their ONE seeded draw of
negatives, the batches (ordered by line length), and the context in which only theta requires grad. Also
the `Progress` and `Cancel` callbacks and `_poll`, which every later stage uses."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from core.config import InfluenceConfig
from core.data.dataset import RecDataset
from core.surrogate.batches import SeqBatch, make_batch, sample_negatives
from core.surrogate.train import Cancelled

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]


def effective_damping(cfg: InfluenceConfig) -> float:
    """lambda of the system (H + lambda I) s = v that LiSSA solves (package docstring): scale * damping."""
    return cfg.scale * cfg.damping


def samples_with_loss(ds: RecDataset, users: Sequence[int] | None = None) -> np.ndarray:
    """Users with at least one transition (>= 2 training items): the samples that have a loss."""
    pool = range(ds.n_samples) if users is None else users
    return np.asarray([int(u) for u in pool if len(ds.train[int(u)]) >= 2], dtype=np.int64)


def fixed_negatives(ds: RecDataset, max_len: int, seed: int) -> list[np.ndarray]:
    """ONE seeded draw of negatives for every user, indexed by user (empty for users without a transition).
    The same draw defines l(z) for v, for the Hessian and for the per-sample gradients."""
    out = [np.zeros(0, dtype=np.int64) for _ in range(ds.n_users)]
    samples = samples_with_loss(ds)
    for u, neg in zip(samples, sample_negatives(ds, samples, max_len, np.random.default_rng(seed))):
        out[int(u)] = neg
    return out


def _make_batch(ds: RecDataset, users: np.ndarray, max_len: int, negatives: Sequence[np.ndarray],
                device: torch.device | str) -> SeqBatch:
    # Trimmed to the batch's widest line: the outputs at real positions are those of the full window.
    return make_batch(ds, users, max_len, [negatives[int(u)] for u in users], trim=True).to(device)


def _by_length(ds: RecDataset, users: np.ndarray) -> np.ndarray:
    """Users ordered by line length (stable), so that consecutive batches are narrow and similar."""
    lengths = np.fromiter((len(ds.train[int(u)]) for u in users), dtype=np.int64, count=len(users))
    return users[np.argsort(lengths, kind="stable")]


def _max_len(model: nn.Module) -> int:
    return int(model.cfg.max_seq_length)


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("influence computations need the model in eval() mode (no dropout)")


@contextlib.contextmanager
def _theta_only(model: nn.Module, layer: nn.Linear) -> Iterator[None]:
    """Only theta requires grad while inside: autograd records nothing upstream of the layer and
    computes no gradient for any other parameter (the bias included: it is not part of theta)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        layer.weight.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _poll(cancel: Cancel | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("influence computation cancelled")
