"""Turning users' training lines into SASRec tensors, and the per-sample BCE loss.

Unlike the reference (input = line[:-2], targets = line[1:-1]), every transition of the line is a
training target, so each sample's own target (the last item) is trained on and measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.data.dataset import RecDataset


@dataclass(frozen=True)
class SeqBatch:
    """Left-padded (batch, max_len) tensors: inputs, positive targets, negative targets (0 = no target)."""

    inputs: torch.Tensor
    positives: torch.Tensor
    negatives: torch.Tensor

    def to(self, device: torch.device | str) -> SeqBatch:
        return SeqBatch(self.inputs.to(device), self.positives.to(device), self.negatives.to(device))


def sample_negatives(ds: RecDataset, users: np.ndarray | list[int], max_len: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """One random negative item per target position (not in the user's training line), as in the
    reference loss, but drawn from a seeded generator so that runs are reproducible."""
    out = []
    n = ds.n_items
    for u in users:
        line = ds.train[u]
        k = min(len(line) - 1, max_len)
        seen = set(line)
        neg = rng.integers(1, n + 1, size=k)
        for j in range(k):  # resample the rare collisions with the user's own items
            while int(neg[j]) in seen and len(seen) < n:
                neg[j] = rng.integers(1, n + 1)
        out.append(neg)
    return out


def make_batch(ds: RecDataset, users: np.ndarray | list[int], max_len: int,
               negatives: list[np.ndarray], trim: bool = False) -> SeqBatch:
    """Inputs line[:-1] and targets line[1:], keeping the most recent `max_len` transitions.

    `trim` drops the leading columns that are padding for every row of the batch. The model gives
    each column the position it would have in the full `max_len` window, and padding never reaches a
    real position, so the outputs at real positions are unchanged; it only saves work (Games lines
    average 6 items in a 50-wide window)."""
    if trim:
        widest = max((min(len(ds.train[u]) - 1, max_len) for u in users), default=1)
        max_len_out = max(widest, 1)
        full = make_batch(ds, users, max_len, negatives)
        return SeqBatch(full.inputs[:, max_len - max_len_out:], full.positives[:, max_len - max_len_out:],
                        full.negatives[:, max_len - max_len_out:])
    b = len(users)
    inputs = np.zeros((b, max_len), dtype=np.int64)
    pos = np.zeros((b, max_len), dtype=np.int64)
    neg = np.zeros((b, max_len), dtype=np.int64)
    for r, (u, ng) in enumerate(zip(users, negatives)):
        line = ds.train[u]
        k = min(len(line) - 1, max_len)
        if k <= 0:
            continue
        inputs[r, max_len - k:] = line[-k - 1:-1]
        pos[r, max_len - k:] = line[-k:]
        neg[r, max_len - k:] = ng[-k:]
    return SeqBatch(torch.from_numpy(inputs), torch.from_numpy(pos), torch.from_numpy(neg))


def bce_terms(model: torch.nn.Module, batch: SeqBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position BCE (positive and negative) and the target mask, both (batch, max_len)."""
    hidden = model(batch.inputs)
    emb = model.item_embeddings
    pos_logits = (hidden * emb(batch.positives)).sum(-1)
    neg_logits = (hidden * emb(batch.negatives)).sum(-1)
    mask = (batch.positives > 0).to(hidden.dtype)
    # -log sigmoid(x) = softplus(-x); numerically safer than the reference's log(sigmoid + 1e-24).
    terms = torch.nn.functional.softplus(-pos_logits) + torch.nn.functional.softplus(neg_logits)
    return terms * mask, mask


def batch_loss(model: torch.nn.Module, batch: SeqBatch) -> torch.Tensor:
    """The training loss: BCE averaged over every target position of the batch (the reference's)."""
    terms, mask = bce_terms(model, batch)
    return terms.sum() / mask.sum().clamp_min(1.0)


def per_sample_loss(model: torch.nn.Module, batch: SeqBatch) -> torch.Tensor:
    """l(z) for each sample in the batch: its own BCE averaged over its own target positions
    (what the reference computes for one sample at a time). Shape (batch,); 0 for a user with no
    transition. Samples do not interact, so the gradient of the sum gives each sample's gradient."""
    terms, mask = bce_terms(model, batch)
    return terms.sum(1) / mask.sum(1).clamp_min(1.0)
