"""Small synthetic datasets in the DEALRec layout, as file contents: for tests, benchmarks and demos
that need a valid upload without the real data."""

from __future__ import annotations

import random


def dealrec_layout_files(n_users: int = 40, n_items: int = 30, seed: int = 0) -> dict[str, bytes]:
    """File name -> bytes of a valid DEALRec layout: each user's training line holds 4-9 random items,
    plus one validation and one test item."""
    rng = random.Random(seed)
    train, valid, test = [], [], []
    for u in range(1, n_users + 1):
        seq = [rng.randint(1, n_items) for _ in range(rng.randint(6, 11))]
        train.append(f"{u} " + " ".join(map(str, seq[:-2])))
        valid.append(f"{u} {seq[-2]}")
        test.append(f"{u} {seq[-1]}")
    items = ["item_id\tsource_item_id\ttitle"] + [f"{i}\tB{i:05d}\tGame number {i}" for i in range(1, n_items + 1)]
    users = ["user_id\tsource_user_id"] + [f"{u}\tU{u:04d}" for u in range(1, n_users + 1)]
    return {
        "sequential_train.txt": ("\n".join(train) + "\n").encode(),
        "sequential_valid.txt": ("\n".join(valid) + "\n").encode(),
        "sequential_test.txt": ("\n".join(test) + "\n").encode(),
        "items.tsv": ("\n".join(items) + "\n").encode(),
        "users.tsv": ("\n".join(users) + "\n").encode(),
    }
