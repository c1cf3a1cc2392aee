"""Interaction logs (CSV, TSV, Parquet, JSONL) with an items table: the format's columns, the
validation of its items and interactions (also used by `recbole.py`), and its loader.

Reading the tables is `tables.py`, parsing their values `values.py`, splitting `split.py`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.data.dataset import RecDataset
from core.data.errors import shown
from core.data.split import Split, build_dataset, check_split
from core.data.tables import Table, read_table
from core.data.values import as_id, as_number, clean_title, ids_of, numbers_of, parse_timestamp

logger = logging.getLogger(__name__)

LOG_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS: tuple[str, ...] = ("item_id", "title")


@dataclass(frozen=True)
class ItemTable:
    """Items in table order: item i (1-based) is `ids[i - 1]`, titled `titles[i - 1]`."""

    ids: tuple[str, ...]
    titles: tuple[str, ...]
    index: dict[str, int]  # source id -> 1-based item index


def read_items(table: Table, id_field: str = "item_id", title_field: str = "title") -> ItemTable:
    """Validate every item row (id present and unique, title non-empty text) and index them in
    table order."""
    ids: list[str] = []
    titles: list[str] = []
    index: dict[str, int] = {}
    for row, (raw_id, raw_title) in enumerate(zip(table.column(id_field), table.column(title_field))):
        item = as_id(raw_id)
        if item is None:
            raise table.error(row, id_field, f"not an item id: {shown(raw_id)}")
        if item in index:
            raise table.error(row, id_field, f"duplicate item id {shown(item)} (first at "
                                             f"{_where(table, index[item] - 1)})")
        if not isinstance(raw_title, str):
            raise table.error(row, title_field, f"the title must be text, not {shown(raw_title)}")
        title = clean_title(raw_title)
        if not title:
            raise table.error(row, title_field, "empty title")
        ids.append(item)
        titles.append(title)
        index[item] = len(ids)
    return ItemTable(tuple(ids), tuple(titles), index)


def _where(table: Table, row: int) -> str:
    return f"row {row + 1}" if table.lines is None else f"line {table.lines[row]}"


@dataclass(frozen=True)
class Interactions:
    """Validated interactions in log row order: source user id, 1-based item index, timestamp.
    `path` is the log they came from, for errors raised after reading (an empty split)."""

    path: Path
    users: list[str]
    items: list[int]
    times: list[float]


def read_interactions(table: Table, items: ItemTable, items_name: str) -> Interactions:
    """Validate every row of a log: user id present, item id in the items table, numeric or ISO-8601
    timestamp, numeric rating where the column exists. The earliest bad row raises.

    Checked a column at a time, with a fast path for the usual all-text or all-number columns: a log
    has millions of rows, and a per-value function call is most of the cost."""
    raw_users, raw_items, raw_times = (table.column(name) for name in LOG_COLUMNS)
    users = ids_of(raw_users)
    item_indices = list(map(items.index.get, ids_of(raw_items)))
    times = numbers_of(raw_times, parse_timestamp)
    raw_ratings = table.column("rating") if table.has("rating") else []
    ratings = numbers_of([None if v == "" else v for v in raw_ratings], as_number)
    problems = [
        (_first_none(users), "user_id", lambda row: f"not a user id: {shown(raw_users[row])}"),
        (_first_none(item_indices), "item_id", lambda row: f"item {shown(raw_items[row])} is not in {items_name}"),
        (_first_none(times), "timestamp",
         lambda row: f"not a number or ISO-8601 time: {shown(raw_times[row])}"),
        # ratings play no part in the samples, but a non-numeric one means the columns are not what
        # the header says; an empty rating is allowed
        (_first_bad_rating(raw_ratings, ratings), "rating",
         lambda row: f"not a number: {shown(raw_ratings[row])}"),
    ]
    bad = [problem for problem in problems if problem[0] is not None]
    if bad:
        row, field, describe = min(bad, key=lambda problem: problem[0])
        raise table.error(row, field, describe(row))
    return Interactions(table.path, users, item_indices, times)  # type: ignore[arg-type]  # no None left


def _first_none(values: list[Any]) -> int | None:
    return next((row for row, value in enumerate(values) if value is None), None)


def _first_bad_rating(raw: list[Any], parsed: list[float | None]) -> int | None:
    return next((row for row, (r, p) in enumerate(zip(raw, parsed)) if p is None and r not in (None, "")),
                None)


def load_interaction_log(log_path: Path, items_path: Path, split: Split = "chrono") -> RecDataset:
    """Load an interaction log (`user_id`, `item_id`, `timestamp`, optional `rating`) and its items
    table (`item_id`, `title`), each CSV / TSV / Parquet / JSONL, and split it (`chrono` or `loo`).

    Users are ordered by first appearance in the log, items by the items table (items nobody
    interacted with are kept). Everything is validated before the dataset is built."""
    check_split(split)
    started = time.perf_counter()
    log_path, items_path = Path(log_path), Path(items_path)
    items = read_items(read_table(items_path, ITEM_COLUMNS))
    interactions = read_interactions(read_table(log_path, LOG_COLUMNS), items, items_path.name)
    ds = build_dataset(interactions, items, split, source=f"interactions:{log_path}")
    logger.info("loaded interaction log %s (%s split): %d users, %d items, %d interactions in %.2f s",
                log_path, split, ds.n_users, ds.n_items, len(interactions.users),
                time.perf_counter() - started)
    return ds
