"""The Games data (DEALRec layout) rewritten as an interaction log: `interactions.csv`
(user_id,item_id,timestamp) and `items.csv` (item_id,title), the layout core's interaction-log loader
reads, so the service can be given the same data in both layouts.

Ids are the source ids (users.tsv's `source_user_id`, items.tsv's `source_item_id`) and titles are the
same, so a user's selection entry and the dataset fingerprint (a content hash, whatever the layout) can
be compared across layouts.

Timestamps. The log is written in three blocks, each in user order: every user's train items, then every
user's valid items, then every user's test items; an interaction's timestamp is its position in the
log. Each user's chronological order is therefore their sequence order train -> valid -> test, and
the users appear in the log (which fixes the loader's user order, and so `limit_users`) in the DEALRec
layout's order.

Which split. Neither reproduces the DEALRec layout's split for every user:
- `loo` makes each user's last item the test item and the one before it the valid item, but most Games
  users have no valid or test item (the layout's split is global, not per user), and some have several.
- `chrono` (the paper's: all interactions by time, first 80 % train, next 10 % valid, rest test) cuts at
  fixed shares, while the Games layout is 87.6 % train (299,987 of 342,329 interactions). The 80 % cut
  falls inside the train block, so the last 26,124 train interactions (the train items of the users at
  the end of the log) become valid, and the later part of the valid block becomes test.
`chrono` does reproduce it exactly for a leading run of users: those whose train items all come before
the 80 % cut and whose valid items all come before the 90 % cut (the valid block starts with the 26,124
train interactions past the 80 % cut, so only the first 8,109 valid interactions stay valid). On Games
that run (`same_split_users`) is the first 21,041 users, far more than the 600 the acceptance run
prunes: with `split="chrono"` and `limit_users` within it, the loaded dataset is the DEALRec layout's,
fingerprint included. The tests use `chrono`. (Of the whole log, chrono keeps 42,376 users: the others'
interactions all fall past the 80 % cut.)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from core.data.dataset import RecDataset
from core.data.dealrec_layout import load_dealrec_layout

LOG_FILE = "interactions.csv"
ITEMS_FILE = "items.csv"

TRAIN, VALID, TEST = 0, 1, 2


@dataclass(frozen=True)
class GamesCsv:
    folder: Path  # holds exactly LOG_FILE and ITEMS_FILE
    same_split_users: int  # leading users whose `chrono` split equals the DEALRec layout's
    n_interactions: int


def write_games_csv(games: Path, dest: Path) -> GamesCsv:
    """Write the DEALRec-layout folder `games` as an interaction log into the new folder `dest`."""
    ds = load_dealrec_layout(games)  # core's own reader: validated, titles cleaned, source ids
    dest.mkdir(parents=True)
    rows = _log_rows(ds)
    with open(dest / LOG_FILE, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(("user_id", "item_id", "timestamp"))
        out.writerows((ds.user_ids[user], ds.item_ids[item - 1], time) for time, (user, item, _) in enumerate(rows))
    with open(dest / ITEMS_FILE, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, lineterminator="\n")  # quotes titles holding commas or quotes
        out.writerow(("item_id", "title"))
        out.writerows(zip(ds.item_ids, ds.item_titles))
    return GamesCsv(dest, _same_split_users(ds.n_users, rows), len(rows))


def _log_rows(ds: RecDataset) -> list[tuple[int, int, int]]:
    """(user index, 1-based item index, part) in log order: the train block, the valid block, the test
    block, each user by user in sequence order. A row's position is its timestamp."""
    return [(user, item, part)
            for part, sequences in ((TRAIN, ds.train), (VALID, ds.valid), (TEST, ds.test))
            for user, sequence in enumerate(sequences)
            for item in sequence]


def _same_split_users(n_users: int, rows: list[tuple[int, int, int]]) -> int:
    """How many leading users get exactly their DEALRec part back from `chrono`, which gives the first
    n*8//10 interactions by time to train and the next up to n*9//10 to valid (the loader's integer cuts;
    timestamps are distinct and ascending in log order, so time order is log order)."""
    n = len(rows)
    cut_train, cut_valid = n * 8 // 10, n * 9 // 10
    moved = [False] * n_users
    for position, (user, _, part) in enumerate(rows):
        chrono = TRAIN if position < cut_train else VALID if position < cut_valid else TEST
        if chrono != part:
            moved[user] = True
    return next((user for user, m in enumerate(moved) if m), n_users)
