"""A control for a selection's length profile: a random draw with exactly its history lengths.

DEALRec's selections hold far longer histories than a random draw (issue 10: 12.9-15.1 items against
7.9-8.8), so the LLM fine-tuned on them also sees about a third more prompt tokens. Whether its gain
over Random comes from *which* samples it picks or only from *how long* they are is what this draw
answers: for every history length L, it takes at random as many samples of length L as the reference
selection took (from the same pool, so there are always enough). Where the reference took every
sample of a length (the sparse tail), so does the draw. The quality bench runs it as the variant
`random+match=M` (bench/variants.py): random, matched to method M's selection of the same seed and
budget.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from core.data.dataset import RecDataset

MATCH_STREAM = 0x6D61746368  # "match"


def history_lengths(ds: RecDataset) -> np.ndarray:
    """Per sample, the number of items before its target (as core.diagnostics counts them)."""
    return np.array([len(line) - 1 for line in ds.train[:ds.n_samples]], dtype=np.int64)


def length_matched_draw(ds: RecDataset, reference: Sequence[int], seed: int) -> list[int]:
    """Sample indices (sorted), as many as `reference`, with the same count of every history length;
    drawn at random within each length (seeded)."""
    lengths = history_lengths(ds)
    ref = np.asarray(reference, dtype=np.int64)
    if ref.size and (ref.min() < 0 or ref.max() >= ds.n_samples or np.unique(ref).size != ref.size):
        raise ValueError("the reference selection must be distinct sample indices of the pool")
    # A stream of its own: not the one the reference method's own sampling drew from with this seed.
    rng = np.random.default_rng(np.random.SeedSequence([seed, MATCH_STREAM]))
    chosen: list[int] = []
    for length, count in sorted(Counter(lengths[ref].tolist()).items()):
        pool = np.flatnonzero(lengths == length)
        chosen += rng.choice(pool, size=count, replace=False).tolist()
    return sorted(int(i) for i in chosen)
