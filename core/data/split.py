"""Splitting (the one implementation, shared by every loader of raw logs): validated interactions
into per-user train / valid / test parts, chronological (the paper's 8:1:1) or leave-one-out, and the
`RecDataset` assembled from them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from core.data.dataset import RecDataset, samples_first
from core.data.errors import DataError

if TYPE_CHECKING:  # types only: interactions.py imports this module to split what it loads
    from core.data.interactions import Interactions, ItemTable

logger = logging.getLogger(__name__)

Split = Literal["chrono", "loo"]
SPLITS: tuple[str, ...] = ("chrono", "loo")


@dataclass(frozen=True)
class SplitParts:
    """Users and their train / valid / test items, each in time order: those with a training item
    first, then those without (each in first-appearance order), as `RecDataset` holds them."""

    user_ids: tuple[str, ...]
    train: tuple[tuple[int, ...], ...]
    valid: tuple[tuple[int, ...], ...]
    test: tuple[tuple[int, ...], ...]
    no_sample_after: tuple[int, ...] = ()


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")


def split_interactions(interactions: Interactions, split: Split) -> SplitParts:
    """Split a log into per-user train / valid / test parts.

    `chrono` is the paper's: all interactions sorted by (timestamp, log row), the first 80% train, the
    next 10% valid, the rest test (floors computed in integers, so float rounding cannot move a
    boundary). `loo`: per user, the last interaction is test, the one before valid, the rest train; a
    user with two interactions has no valid item, one with a single interaction only a train item.
    Users without a train interaction (chrono: all of theirs came late) have no sample; they are kept,
    after the others, for the evaluation."""
    check_split(split)
    n = len(interactions.users)
    order = sorted(range(n), key=interactions.times.__getitem__)  # stable: ties keep the log's order
    user_index = {user: u for u, user in enumerate(dict.fromkeys(interactions.users))}
    user_of = [user_index[user] for user in interactions.users]
    items = interactions.items
    by_user: list[tuple[list[int], list[int], list[int]]] = [([], [], []) for _ in user_index]
    if split == "chrono":
        n_train, n_until_valid = n * 8 // 10, n * 9 // 10
        for part, rows in enumerate((order[:n_train], order[n_train:n_until_valid], order[n_until_valid:])):
            for row in rows:
                by_user[user_of[row]][part].append(items[row])
    else:
        for row in order:
            by_user[user_of[row]][0].append(items[row])
        for train, valid, test in by_user:
            if len(train) >= 2:
                test.append(train.pop())
            if len(train) >= 2:
                valid.append(train.pop())

    without = sum(1 for train, _, _ in by_user if not train)
    if without:
        logger.info("%d of %d users have no training interaction after the %s split: no sample, kept for "
                    "the evaluation", without, len(by_user), split)
    return SplitParts(**samples_first(list(user_index), *([line[part] for line in by_user] for part in range(3))))


def build_dataset(interactions: Interactions, items: ItemTable, split: Split, source: str) -> RecDataset:
    """Split validated interactions and assemble the dataset; refuse a split that leaves no sample."""
    parts = split_interactions(interactions, split)
    if not any(parts.train):
        raise DataError(f"no user has a training interaction after the {split} split "
                        f"({len(interactions.users)} interactions)", file=interactions.path)
    return RecDataset(user_ids=parts.user_ids, item_ids=items.ids, item_titles=items.titles,
                      train=parts.train, valid=parts.valid, test=parts.test, source=source,
                      no_sample_after=parts.no_sample_after)
