"""The one in-memory dataset that every loader produces and every stage consumes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RecDataset:
    """Users, items and their chronological interactions, indexed densely.

    Items are indexed 1..n_items (0 is reserved for padding); `item_ids[i - 1]` and `item_titles[i - 1]`
    describe item i. Users are indexed 0..n_users-1 and `user_ids[u]` is the source id.

    One training sample per user (the paper's setting): `train[u][:-1]` is the history and
    `train[u][-1]` the target. `valid[u]` / `test[u]` hold the user's validation / test items
    (possibly empty); for validation the history is `train[u]`, for test `train[u] + valid[u]`.
    """

    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    item_titles: tuple[str, ...]
    train: tuple[tuple[int, ...], ...]
    valid: tuple[tuple[int, ...], ...]
    test: tuple[tuple[int, ...], ...]
    source: str = ""
    fingerprint: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", compute_fingerprint(self))

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def history(self, user: int) -> tuple[int, ...]:
        return self.train[user][:-1]

    def target(self, user: int) -> int:
        return self.train[user][-1]

    def limit_users(self, n: int | None) -> RecDataset:
        """Keep the first `n` users (all items stay, so item indices are unchanged)."""
        if n is None or n >= self.n_users:
            return self
        if n < 1:
            raise ValueError("limit_users must be at least 1")
        return RecDataset(
            user_ids=self.user_ids[:n], item_ids=self.item_ids, item_titles=self.item_titles,
            train=self.train[:n], valid=self.valid[:n], test=self.test[:n], source=self.source,
        )

    def statistics(self) -> dict:
        n_train = sum(len(s) for s in self.train)
        return {
            "users": self.n_users,
            "items": self.n_items,
            "train_interactions": n_train,
            "mean_train_length": round(n_train / max(self.n_users, 1), 3),
            "users_with_valid": sum(1 for s in self.valid if s),
            "users_with_test": sum(1 for s in self.test if s),
            "valid_interactions": sum(len(s) for s in self.valid),
            "test_interactions": sum(len(s) for s in self.test),
            "fingerprint": self.fingerprint,
        }


def compute_fingerprint(ds: RecDataset) -> str:
    """A content hash: same users, items, titles and sequences give the same fingerprint,
    whatever file layout they came from."""
    h = hashlib.sha256()

    def put(s: str) -> None:
        b = s.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    put("dealrec-dataset-v1")
    for uid in ds.user_ids:
        put(uid)
    for iid, title in zip(ds.item_ids, ds.item_titles):
        put(iid)
        put(title)
    for part in (ds.train, ds.valid, ds.test):
        put(f"part:{len(part)}")
        for seq in part:
            put(" ".join(map(str, seq)))
    return h.hexdigest()[:32]
