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


def split_users(files: dict[str, bytes], n_old: int) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """A layout's files as (its first `n_old` users, the other users as an addition in the form
    `dealrec extend` takes: the same files, each header line sent again). The item table stays
    whole in the first part (the catalogue is known before the new users arrive)."""
    old, new = {}, {}
    for name, data in files.items():
        if name == "items.tsv":
            old[name] = data
            continue
        lines = data.decode().splitlines(keepends=True)
        head = lines[:1] if name.endswith(".tsv") else []
        body = lines[len(head):]
        old[name] = "".join(head + body[:n_old]).encode()
        new[name] = "".join(head + body[n_old:]).encode()
    return old, new
