"""Full-ranking metrics (Recall@K, NDCG@K) and the top-K step with exclusion of seen items.

Pure functions: no model, no dataset. `ranked` arrays use -1 for "no item" (a slot that exists only
because fewer than K items were left to rank); -1 never counts as a hit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

DEFAULT_KS: tuple[int, ...] = (10, 20, 50)


def _hit_matrix(ranked: np.ndarray, truth: Sequence[set[int]]) -> np.ndarray:
    """Boolean (users, columns): ranked[u, j] is in truth[u]. Vectorised by encoding (user, item)
    pairs as one int64 key, so no per-user Python loop runs over the ranked columns."""
    n_users = ranked.shape[0]
    sizes = np.fromiter((len(t) for t in truth), dtype=np.int64, count=n_users)
    flat_truth = np.fromiter((i for t in truth for i in t), dtype=np.int64, count=int(sizes.sum()))
    span = int(max(ranked.max(initial=0), flat_truth.max(initial=0))) + 1
    truth_keys = np.repeat(np.arange(n_users, dtype=np.int64), sizes) * span + flat_truth
    ranked_keys = np.arange(n_users, dtype=np.int64)[:, None] * span + ranked
    # -1 ("no item") would encode to the previous user's last item: mask it out explicitly.
    return np.isin(ranked_keys, truth_keys) & (ranked >= 0)


def recall_ndcg_at_k(ranked: np.ndarray, truth: Sequence[Iterable[int]],
                     ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@K and NDCG@K for each K in `ks`, averaged over users whose truth is non-empty.

    ranked: (users, >= max(ks)) item indices, best first, no duplicates within a row.
    truth: per user, the relevant items (a set or any iterable; duplicates are ignored).
    Recall = hits in the top K / |truth|. NDCG = DCG / IDCG with binary relevance, discount
    1 / log2(rank + 2) (rank from 0), IDCG over the first min(|truth|, K) positions.
    Returns {"recall@K": ..., "ndcg@K": ...}; all 0.0 when no user has a non-empty truth.
    """
    ranked = np.asarray(ranked, dtype=np.int64)
    if ranked.ndim != 2 or ranked.shape[0] != len(truth):
        raise ValueError(f"ranked must be (users, k) with users = len(truth) = {len(truth)}, got {ranked.shape}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError("ks must be positive")
    max_k = max(ks)
    if ranked.shape[1] < max_k:
        raise ValueError(f"ranked has {ranked.shape[1]} columns, fewer than max(ks) = {max_k}")

    sets = [set(int(i) for i in t) for t in truth]
    keep = np.fromiter((len(s) > 0 for s in sets), dtype=bool, count=len(sets))
    out: dict[str, float] = {}
    if not keep.any():
        for k in ks:
            out[f"recall@{k}"] = 0.0
            out[f"ndcg@{k}"] = 0.0
        return out

    ranked = ranked[keep, :max_k]
    sets = [s for s, k in zip(sets, keep) if k]
    n_truth = np.fromiter((len(s) for s in sets), dtype=np.float64, count=len(sets))
    hits = _hit_matrix(ranked, sets).astype(np.float64)
    discount = 1.0 / np.log2(np.arange(max_k, dtype=np.float64) + 2.0)
    dcg_cum = np.cumsum(hits * discount, axis=1)  # DCG@K = dcg_cum[:, K-1]
    hits_cum = np.cumsum(hits, axis=1)
    ideal_cum = np.cumsum(discount)  # IDCG with m relevant items = ideal_cum[m-1]
    for k in ks:
        idcg = ideal_cum[np.minimum(n_truth, k).astype(np.int64) - 1]
        out[f"recall@{k}"] = float(np.mean(hits_cum[:, k - 1] / n_truth))
        out[f"ndcg@{k}"] = float(np.mean(dcg_cum[:, k - 1] / idcg))
    return out


def topk_excluding(scores: torch.Tensor, exclude: Sequence[Iterable[int]], k: int) -> np.ndarray:
    """Top-k item indices per row, best first, never the padding column 0 nor an excluded item.

    scores: (batch, n_items + 1), column 0 = padding. Excluded entries are set to -inf (the
    reference sets them to 0, which still outranks every negative score). When fewer than k items
    remain for a row, the missing slots are -1 so the result is always (batch, k).
    The input tensor is not modified.
    """
    if scores.ndim != 2 or scores.shape[0] != len(exclude):
        raise ValueError(f"scores must be (batch, n_items + 1) with batch = len(exclude), got {tuple(scores.shape)}")
    if k < 1:
        raise ValueError("k must be positive")
    masked = scores.detach().clone()
    masked[:, 0] = float("-inf")
    lists = [list(e) for e in exclude]
    sizes = torch.tensor([len(e) for e in lists], dtype=torch.long)
    if int(sizes.sum()) > 0:
        rows = torch.repeat_interleave(torch.arange(len(lists)), sizes).to(masked.device)
        cols = torch.tensor([i for e in lists for i in e], dtype=torch.long, device=masked.device)
        masked[rows, cols] = float("-inf")
    n_cols = min(k, masked.shape[1])
    values, idx = torch.topk(masked, n_cols, dim=1, largest=True, sorted=True)
    idx = idx.masked_fill(torch.isneginf(values), -1).cpu().numpy().astype(np.int64)
    if n_cols < k:  # fewer items than k in the catalogue: pad with "no item"
        idx = np.concatenate([idx, np.full((idx.shape[0], k - n_cols), -1, dtype=np.int64)], axis=1)
    return idx
