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

    Users without a training sample (an empty training line: under a global chronological split all
    of a user's interactions may fall into validation / test) come last: users 0..n_samples-1 have a
    sample, n_samples..n_users-1 have none. A sample's index is therefore its user's index, and every
    stage that works on samples (surrogate training, influence, effort, selection, outputs) takes
    range(n_samples); evaluation takes every user whose history allows it (a test item after a
    non-empty train + valid). `no_sample_after[j]` is how many users with a sample precede user
    n_samples + j in the source (file or log order), so that `limit_users` keeps those among the
    first users.
    """

    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    item_titles: tuple[str, ...]
    train: tuple[tuple[int, ...], ...]
    valid: tuple[tuple[int, ...], ...]
    test: tuple[tuple[int, ...], ...]
    source: str = ""
    fingerprint: str = field(default="", compare=False)
    no_sample_after: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n_samples = len(self.train) - len(self.no_sample_after)
        if n_samples < 0 or not all(self.train[:n_samples]) or any(self.train[n_samples:]):
            raise ValueError("users without a training sample must come last, one `no_sample_after` entry each")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", compute_fingerprint(self))

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_samples(self) -> int:
        """Users with a training sample: users 0..n_samples-1 (the pool a selection draws from)."""
        return self.n_users - len(self.no_sample_after)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def history(self, user: int) -> tuple[int, ...]:
        return self._sample_line(user)[:-1]

    def target(self, user: int) -> int:
        return self._sample_line(user)[-1]

    def _sample_line(self, user: int) -> tuple[int, ...]:
        line = self.train[user]
        if not line:
            raise ValueError(f"user {user} ({self.user_ids[user]}) has no training sample")
        return line

    def limit_users(self, n: int | None) -> RecDataset:
        """Keep the first `n` users with a training sample, and the users without one that precede the
        n-th of them in the source (all items stay, so item indices are unchanged)."""
        if n is None or n >= self.n_samples:
            return self
        if n < 1:
            raise ValueError("limit_users must be at least 1")
        extra = [j for j, after in enumerate(self.no_sample_after) if after < n]
        keep = list(range(n)) + [self.n_samples + j for j in extra]
        return RecDataset(
            user_ids=tuple(self.user_ids[u] for u in keep), item_ids=self.item_ids, item_titles=self.item_titles,
            train=tuple(self.train[u] for u in keep), valid=tuple(self.valid[u] for u in keep),
            test=tuple(self.test[u] for u in keep), source=self.source,
            no_sample_after=tuple(self.no_sample_after[j] for j in extra),
        )

    def evaluable_without_sample(self) -> int:
        """Users without a training sample who still count in the test evaluation (a test item after
        validation items: their history)."""
        return sum(1 for u in range(self.n_samples, self.n_users) if self.valid[u] and self.test[u])

    def statistics(self) -> dict:
        n_train = sum(len(s) for s in self.train)
        without = self.n_users - self.n_samples
        notes = []
        if without:
            notes.append(f"{without} of {self.n_users} users have no training sample (no training item: all their "
                         "interactions are in validation / test); they are never selected, and the "
                         f"{self.evaluable_without_sample()} of them with validation and test items count in "
                         "the test evaluation")
        return {
            "users": self.n_users,
            "items": self.n_items,
            "samples": self.n_samples,
            "users_without_training_sample": without,
            "train_interactions": n_train,
            "mean_train_length": round(n_train / max(self.n_samples, 1), 3),
            "users_with_valid": sum(1 for s in self.valid if s),
            "users_with_test": sum(1 for s in self.test if s),
            "valid_interactions": sum(len(s) for s in self.valid),
            "test_interactions": sum(len(s) for s in self.test),
            "fingerprint": self.fingerprint,
            "notes": notes,
        }


def samples_first(user_ids: list[str] | tuple[str, ...], train: list | tuple, valid: list | tuple,
                  test: list | tuple) -> dict:
    """The users of a source, in source order, rearranged as `RecDataset` holds them: those with a
    training sample first, then those without (both in source order), with `no_sample_after`."""
    sampled = [u for u, line in enumerate(train) if line]
    unsampled, after, seen = [], [], 0
    for u, line in enumerate(train):
        if line:
            seen += 1
        else:
            unsampled.append(u)
            after.append(seen)
    order = sampled + unsampled
    return {"user_ids": tuple(user_ids[u] for u in order), "train": tuple(tuple(train[u]) for u in order),
            "valid": tuple(tuple(valid[u]) for u in order), "test": tuple(tuple(test[u]) for u in order),
            "no_sample_after": tuple(after)}


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
