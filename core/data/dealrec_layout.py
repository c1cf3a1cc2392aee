"""The DEALRec reference layout: a folder already split into per-user train / valid / test lines.

    sequential_train.txt   user_id [item_id ...]         (one line per user; a user without items has
                                                          no training sample but may be evaluated)
    sequential_valid.txt   user_id [item_id ...]         (same users, same order)
    sequential_test.txt    user_id [item_id ...]         (same users, same order)
    items.tsv              item_id, source_item_id, title (header line, tab-separated)
    users.tsv              user_id, source_user_id        (optional; else the source id is user_id)

Ids in the .txt files are 1-based integers. Plain string handling keeps the Games data (49,156
users, 300k item ids) well under a second.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

from core.data.dataset import RecDataset, samples_first
from core.data.errors import DataError, shown
from core.data.tables import read_table, read_text
from core.data.values import clean_title

logger = logging.getLogger(__name__)

TRAIN_FILE = "sequential_train.txt"
VALID_FILE = "sequential_valid.txt"
TEST_FILE = "sequential_test.txt"
ITEMS_FILE = "items.tsv"
USERS_FILE = "users.tsv"
SEQUENCE_FILES = (TRAIN_FILE, VALID_FILE, TEST_FILE)
ITEM_COLUMNS: tuple[str, ...] = ("item_id", "source_item_id", "title")
USER_COLUMNS: tuple[str, ...] = ("user_id", "source_user_id")

# Any character that has no place in a sequence file of ASCII ids separated by blanks.
_NOT_ID_TEXT = re.compile(r"[^0-9 \t\r\n]")

# A parsed sequence line: (physical line number, user id, 1-based item indices)
SeqLine = tuple[int, int, tuple[int, ...]]


def load_dealrec_layout(path: Path) -> RecDataset:
    """Load a DEALRec-layout folder. Every file is validated in full before the dataset is built:
    ids are integers, sequence items exist in items.tsv, valid/test list the train users in the same
    order, titles are non-empty. Users with an empty training line have no sample: they come after
    the others (see `RecDataset`)."""
    started = time.perf_counter()
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"not a folder (expected {TRAIN_FILE}, {VALID_FILE}, {TEST_FILE}, {ITEMS_FILE})",
                        file=folder)
    item_ids, titles, item_index = _read_items(folder / ITEMS_FILE)
    train_lines = _read_sequences(folder / TRAIN_FILE, item_index)
    _check_train(folder / TRAIN_FILE, train_lines)
    users = [user for _, user, _ in train_lines]
    valid = _read_aligned(folder / VALID_FILE, users, item_index)
    test = _read_aligned(folder / TEST_FILE, users, item_index)
    user_ids = _source_user_ids(folder, train_lines)
    users_in_order = samples_first(user_ids, [items for _, _, items in train_lines], valid, test)
    ds = RecDataset(item_ids=item_ids, item_titles=titles, source=f"dealrec:{folder}", **users_in_order)
    if ds.n_samples < ds.n_users:
        logger.info("%s: %d of %d users have an empty training line (no sample)", folder,
                    ds.n_users - ds.n_samples, ds.n_users)
    logger.info("loaded DEALRec layout %s: %d users, %d items in %.2f s", folder, ds.n_users, ds.n_items,
                time.perf_counter() - started)
    return ds


def _parse_int_id(value: str) -> int | None:
    """A 1-based id written in ASCII digits (at most 18: any larger is no id, and int() refuses
    thousands), else None (int() alone would take '+3', '1_0' or non-ASCII digits)."""
    value = value.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        return None
    number = int(value)
    return number if number >= 1 else None


def _read_items(path: Path) -> tuple[tuple[str, ...], tuple[str, ...], dict[int, int]]:
    """Item source ids and titles, ordered by item id, and the map item id -> 1-based index.
    Ids 1..n map to themselves; other ids are renumbered densely in id order."""
    table = read_table(path, ITEM_COLUMNS)
    rows: dict[int, tuple[str, str]] = {}
    seen_sources: dict[str, int] = {}
    columns = zip(table.column("item_id"), table.column("source_item_id"), table.column("title"))
    for row, (raw_id, raw_source, raw_title) in enumerate(columns):
        item = _parse_int_id(raw_id)
        if item is None:
            raise table.error(row, "item_id", f"not a positive integer id: {shown(raw_id)}")
        if item in rows:
            raise table.error(row, "item_id", f"duplicate item id {item}")
        source = raw_source.strip()
        if not source:
            raise table.error(row, "source_item_id", "empty source item id")
        if source in seen_sources:
            raise table.error(row, "source_item_id",
                              f"source item id {shown(source)} already used by item {seen_sources[source]}")
        title = clean_title(raw_title)
        if not title:
            raise table.error(row, "title", "empty title")
        rows[item] = (source, title)
        seen_sources[source] = item
    order = sorted(rows)
    if order[-1] != len(order):
        logger.info("%s: item ids are not 1..%d; renumbered densely in id order", path, len(order))
    index = {item: i for i, item in enumerate(order, start=1)}
    return (tuple(rows[item][0] for item in order), tuple(rows[item][1] for item in order), index)


def _read_sequences(path: Path, item_index: dict[int, int]) -> list[SeqLine]:
    """Every line of a sequence file, parsed and checked (ids, known items). Trailing blank lines are
    tolerated, blank lines elsewhere are not (they would shift every later user)."""
    text = read_text(path, sequence_field_at)
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise empty_sequence_file(path)
    # The fast path below trusts int() only when the file holds nothing but ASCII digits and blanks
    # (int() alone would also take '+3', '1_0' or non-ASCII digits).
    plain = _NOT_ID_TEXT.search(text) is None
    lookup = item_index.__getitem__
    parsed: list[SeqLine] = []
    for number, line in enumerate(lines, start=1):
        fast = _parse_plain_line(line, lookup) if plain else None
        user, items = fast or parse_sequence_line(path, number, line, item_index)
        parsed.append((number, user, items))
    return parsed


def empty_sequence_file(path: Path) -> DataError:
    return DataError("the file is empty", file=path, line=1, field="user_id")


def sequence_field_at(header_line: str, line: int, prefix: bytes) -> str:
    """A bad byte in a sequence line is in the user id when nothing precedes it, else in an item id."""
    return "item_id" if prefix.split() else "user_id"


def _parse_plain_line(line: str, lookup: Callable[[int], int]) -> tuple[int, tuple[int, ...]] | None:
    """Fast path for a line of ASCII ids; None (the slow path then says why) when the line is blank,
    its user is 0 or an item is unknown."""
    try:
        user, *items = map(int, line.split())
        return (user, tuple(map(lookup, items))) if user >= 1 else None
    except (ValueError, KeyError):
        return None


def parse_sequence_line(path: Path, number: int, line: str,
                        item_index: dict[int, int] | None) -> tuple[int, tuple[int, ...]]:
    """Token by token: the line's user and items, or a DataError naming the first bad token. Lines the
    fast path refused for their characters alone (say, other whitespace between ids) still load.
    Without `item_index` (a check before items.tsv is read) items are checked as ids only and
    returned as written."""
    tokens = line.split()
    if not tokens:
        raise DataError("blank line (every line starts with a user id)", file=path, line=number,
                        field="user_id")
    user = _parse_int_id(tokens[0])
    if user is None:
        raise DataError(f"user id {shown(tokens[0])} is not a positive integer", file=path, line=number,
                        field="user_id")
    items = []
    for position, token in enumerate(tokens[1:], start=1):
        item = _parse_int_id(token)
        if item is None:
            raise DataError(f"item id {shown(token)} (position {position}) is not a positive integer", file=path,
                            line=number, field="item_id")
        if item_index is None:
            items.append(item)
            continue
        if item not in item_index:
            raise DataError(f"item id {item} (position {position}) is not in {ITEMS_FILE}", file=path,
                            line=number, field="item_id")
        items.append(item_index[item])
    return user, tuple(items)


def _check_train(path: Path, lines: list[SeqLine]) -> None:
    """A user may appear once; a line without items is a user without a sample, but some user must
    have one."""
    first_line: dict[int, int] = {}
    for number, user, _ in lines:
        if user in first_line:
            raise DataError(f"user {user} already has line {first_line[user]}", file=path, line=number,
                            field="user_id")
        first_line[user] = number
    if not any(items for _, _, items in lines):
        raise DataError("no user has a training item (a sample needs at least a target)", file=path, line=1,
                        field="item_id")


def misaligned_user(path: Path, number: int, user: int, expected: int) -> DataError:
    return DataError(f"user {user} where {TRAIN_FILE} line {number} has user {expected} "
                     "(the files must list the same users in the same order)", file=path,
                     line=number, field="user_id")


def _read_aligned(path: Path, users: list[int], item_index: dict[int, int]) -> tuple[tuple[int, ...], ...]:
    """A valid/test file: exactly one line per train user, in the train file's order."""
    lines = _read_sequences(path, item_index)
    for number, user, _ in lines:
        if number > len(users):
            raise DataError(f"extra line: {TRAIN_FILE} has {len(users)} users", file=path, line=number,
                            field="user_id")
        if user != users[number - 1]:
            raise misaligned_user(path, number, user, users[number - 1])
    if len(lines) < len(users):
        raise DataError(f"missing user {users[len(lines)]}: {TRAIN_FILE} has {len(users)} users, this file "
                        f"{len(lines)} lines", file=path, line=len(lines) + 1, field="user_id")
    return tuple(items for _, _, items in lines)


def _source_user_ids(folder: Path, train_lines: list[SeqLine]) -> tuple[str, ...]:
    """Source user ids from users.tsv, or the numeric ids as text where the folder has none."""
    path = folder / USERS_FILE
    if not path.exists():
        return tuple(str(user) for _, user, _ in train_lines)
    table = read_table(path, USER_COLUMNS)
    sources: dict[int, str] = {}
    for row, (raw_id, raw_source) in enumerate(zip(table.column("user_id"), table.column("source_user_id"))):
        user = _parse_int_id(raw_id)
        if user is None:
            raise table.error(row, "user_id", f"not a positive integer id: {shown(raw_id)}")
        if user in sources:
            raise table.error(row, "user_id", f"duplicate user id {user}")
        source = raw_source.strip()
        if not source:
            raise table.error(row, "source_user_id", "empty source user id")
        sources[user] = source
    for number, user, _ in train_lines:
        if user not in sources:
            raise DataError(f"user {user} is not in {USERS_FILE}", file=folder / TRAIN_FILE, line=number,
                            field="user_id")
    return tuple(sources[user] for _, user, _ in train_lines)
