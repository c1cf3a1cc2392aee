"""Interaction logs (CSV, TSV, Parquet, JSONL) with an items table, and the pieces every loader shares.

Shared with `dealrec_layout.py` and `recbole.py`: reading a table so that every bad value can be reported
by file, line (or Parquet row) and column; cleaning titles; parsing timestamps; and the one
implementation of the chronological (paper) and leave-one-out splits.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from core.data.dataset import RecDataset
from core.data.errors import DataError

logger = logging.getLogger(__name__)

Split = Literal["chrono", "loo"]
SPLITS: tuple[str, ...] = ("chrono", "loo")
TABLE_EXTENSIONS: tuple[str, ...] = (".csv", ".tsv", ".parquet", ".jsonl")
LOG_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS: tuple[str, ...] = ("item_id", "title")

# Everything that would break a title across lines or columns when it is written back out.
_TITLE_BREAKS = re.compile(r"[\t\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")

# (header line, line number, bytes of that line before the bad byte) -> name of the field holding it
FieldAt = Callable[[str, int, bytes], "str | None"]


# ---------------------------------------------------------------------------------------------------
# Reading files


def read_text(path: Path, field_at: FieldAt | None = None) -> str:
    """The whole file as UTF-8 text (a leading BOM dropped).

    Read and decoded at once rather than streamed: a streaming decoder fails on the chunk that holds a
    bad byte, possibly many lines before it, and the error must name the exact line (and, through
    `field_at`, the column)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", file=path) from None
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror or exc}", file=path) from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        prefix = data[line_start:exc.start]
        header = header_text(data.split(b"\n", 1)[0])
        field = field_at(header, line, prefix) if field_at else None
        raise not_utf8(path, data[exc.start], line, len(prefix) + 1, field) from None


def header_text(first_line: bytes) -> str:
    """A file's first line (its BOM already dropped) as a `FieldAt` receives it."""
    return first_line.decode("utf-8", "replace").rstrip("\r")


def not_utf8(path: Path, byte: int, line: int, column: int, field: str | None) -> DataError:
    """The error for the first byte that is not UTF-8 (`column`: 1-based, in bytes)."""
    return DataError(f"not UTF-8 text: byte 0x{byte:02x} at column {column}", file=path, line=line, field=field)


def delimited_field_at(delimiter: str, rename: Callable[[str], str] | None = None) -> FieldAt:
    """The column of a delimited file that holds a bad byte, counted from the raw header line."""
    rename_ = rename or (lambda name: name)

    def field_at(header_line: str, line: int, prefix: bytes) -> str | None:
        names = [rename_(name.strip()) for name in header_line.split(delimiter)]
        column = prefix.count(delimiter.encode())
        return names[column] if column < len(names) else None

    return field_at


def jsonl_field_at(header_line: str, line: int, prefix: bytes) -> str | None:
    """The key whose value holds a bad byte in a JSONL line: the last key before that byte."""
    keys = re.findall(rb'"((?:[^"\\]|\\.)*)"\s*:', prefix)
    return keys[-1].decode("utf-8", "replace") if keys else None


@dataclass(frozen=True)
class Table:
    """A table read from one file: its column names and row values, plus where each row sits in the
    file, so that every value-level error can name the file, the line (Parquet: the row) and the column.
    """

    path: Path
    header: tuple[str, ...]
    lines: tuple[int, ...] | None  # physical line of each row (header = line 1); None for Parquet rows
    extract: Callable[[str], list[Any]]

    def has(self, name: str) -> bool:
        return name in self.header

    def column(self, name: str) -> list[Any]:
        """All values of one column, in row order (None where a JSONL row lacks the key)."""
        if name not in self.header:
            raise self.missing_column(name)
        return self.extract(name)

    def missing_column(self, name: str, hint: str = "") -> DataError:
        have = ", ".join(self.header) or "nothing"
        return DataError(f"missing column '{name}'{hint}; the file has: {have}", file=self.path,
                         line=None if self.lines is None else 1, field=name)

    def error(self, row: int, field: str | None, message: str) -> DataError:
        """An error about the value in 0-based data row `row`."""
        if self.lines is None:
            return DataError(f"row {row + 1}: {message}", file=self.path, field=field)
        return DataError(message, file=self.path, line=self.lines[row], field=field)


def read_table(path: Path, required: Sequence[str], *, delimiter: str | None = None,
               quoting: int = csv.QUOTE_MINIMAL, rename: Callable[[str], str] | None = None) -> Table:
    """Read a CSV / TSV / Parquet / JSONL table (chosen by extension unless `delimiter` is given).

    `required` columns are checked here, so that an empty or header-only file, or a missing column,
    is reported against the first column the caller needs. `rename` maps header names (RecBole's
    `name:type` fields) to plain names."""
    path = Path(path)
    kind = table_kind(path, delimiter)
    if kind == "parquet":
        return _read_parquet(path, required)
    if kind == "jsonl":
        return _read_jsonl(path, required)
    return _read_delimited(path, required, kind, quoting, rename or (lambda name: name))


def table_kind(path: Path, delimiter: str | None = None) -> str:
    """How `read_table` reads `path`: "parquet", "jsonl", or the delimiter of a delimited file (the
    given one, else the extension's). A missing file or an unknown extension is a DataError."""
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "not a file", file=path)
    if delimiter is not None:
        return delimiter
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".jsonl"):
        return suffix[1:]
    by_extension = {".csv": ",", ".tsv": "\t"}.get(suffix)
    if by_extension is None:
        raise DataError(f"unsupported table format '{suffix}'; expected one of "
                        f"{', '.join(TABLE_EXTENSIONS)}", file=path)
    return by_extension


def _read_delimited(path: Path, required: Sequence[str], delimiter: str, quoting: int,
                    rename: Callable[[str], str]) -> Table:
    text = read_text(path, delimited_field_at(delimiter, rename))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    header: tuple[str, ...] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    end = 0
    try:
        for row in reader:
            start, end = end + 1, reader.line_num  # a quoted field may span lines: report the first
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = check_header(path, [rename(name.strip()) for name in row], required, start)
                continue
            if len(row) != len(header):
                field = header[len(row)] if len(row) < len(header) else None
                raise DataError(f"{len(row)} fields where the header has {len(header)}", file=path,
                                line=start, field=field)
            rows.append(row)
            lines.append(start)
    except csv.Error as exc:
        raise malformed_line(path, exc, reader.line_num) from None
    if header is None:
        raise empty_delimited(path, required)
    if not rows:
        raise DataError("no data rows after the header", file=path, line=2, field=required[0])
    positions = {name: i for i, name in enumerate(header)}
    return Table(path, header, tuple(lines), lambda name: [row[positions[name]] for row in rows])


def malformed_line(path: Path, exc: csv.Error, line: int) -> DataError:
    return DataError(f"malformed line: {exc}", file=path, line=line)


def empty_delimited(path: Path, required: Sequence[str]) -> DataError:
    return DataError("the file is empty (no header line)", file=path, line=1, field=required[0])


def check_header(path: Path, names: list[str], required: Sequence[str], line: int) -> tuple[str, ...]:
    """Check a delimited file's header: no duplicate names, every required column present."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"column '{name}' appears twice in the header", file=path, line=line, field=name)
        seen.add(name)
    for name in required:
        if name not in seen:
            raise DataError(f"missing column '{name}'; the header has: {', '.join(names)}", file=path,
                            line=line, field=name)
    return tuple(names)


def _read_jsonl(path: Path, required: Sequence[str]) -> Table:
    text = read_text(path, jsonl_field_at)
    rows: list[dict] = []
    lines: list[int] = []
    keys: dict[str, None] = {}  # insertion-ordered set of every key seen
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        obj = jsonl_row(path, number, raw, required)
        rows.append(obj)
        lines.append(number)
        keys.update(dict.fromkeys(obj))
    if not rows:
        raise empty_jsonl(path, required)
    return Table(path, tuple(keys), tuple(lines), lambda name: [obj.get(name) for obj in rows])


def jsonl_row(path: Path, number: int, raw: str, required: Sequence[str]) -> dict:
    """One non-blank JSONL line: a JSON object holding every required key, else a DataError."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc.msg} (column {exc.colno})", file=path, line=number) from None
    if not isinstance(obj, dict):
        raise DataError("each line must hold one JSON object", file=path, line=number)
    for name in required:
        if name not in obj:
            raise DataError(f"missing key '{name}'", file=path, line=number, field=name)
    return obj


def empty_jsonl(path: Path, required: Sequence[str]) -> DataError:
    return DataError("the file is empty (no JSON object)", file=path, line=1, field=required[0])


def _read_parquet(path: Path, required: Sequence[str]) -> Table:
    import pyarrow as pa  # imported here: only Parquet needs it, and it is slow to import
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except parquet_errors(pa) as exc:
        raise unreadable_parquet(path, exc) from None
    header = tuple(table.column_names)
    check_parquet_columns(path, header, table.num_rows, required)

    unreadable = (pa.ArrowException, ValueError, OverflowError)  # bad UTF-8, out-of-range dates

    def extract(name: str) -> list[Any]:
        column = table.column(name)
        try:
            return column.to_pylist()
        except unreadable as exc:
            for row in range(len(column)):  # rare: find the culprit for the message
                try:
                    column[row].as_py()
                except unreadable:
                    raise DataError(f"row {row + 1}: unreadable value: {exc}", file=path,
                                    field=name) from None
            raise DataError(f"unreadable column: {exc}", file=path, field=name) from None

    return Table(path, header, None, extract)


def parquet_errors(pa: Any) -> tuple[type[Exception], ...]:
    """What a Parquet file that cannot be read raises (pyarrow passed in: it is imported lazily)."""
    return (pa.ArrowException, OSError, ValueError)


def unreadable_parquet(path: Path, exc: Exception) -> DataError:
    return DataError(f"not a readable Parquet file: {exc}", file=path)


def check_parquet_columns(path: Path, header: Sequence[str], num_rows: int, required: Sequence[str]) -> None:
    """A Parquet file's columns and row count against what the caller requires."""
    for name in required:
        if name not in header:
            raise DataError(f"missing column '{name}'; the file has: {', '.join(header) or 'nothing'}",
                            file=path, field=name)
    if num_rows == 0:
        raise DataError("row 1: the file has no rows", file=path, field=required[0])


def header_table(path: Path, header: Sequence[str]) -> Table:
    """A Table holding a delimited file's header and no rows: checks that need only the header
    (`Table.missing_column`, `recbole.title_field`) then run exactly as they do on the full table."""
    return Table(path, tuple(header), (), lambda name: [])


# ---------------------------------------------------------------------------------------------------
# Values


def clean_title(raw: str) -> str:
    """A title on one line: tabs and line breaks become spaces (prompts and TSV exports stay intact),
    outer whitespace is dropped; other spacing is kept as written."""
    return _TITLE_BREAKS.sub(" ", raw).strip()


def as_id(value: Any) -> str | None:
    """A source id as a string ("12" whether the file held the text "12" or the number 12), or None."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():  # an int column that took a NaN went float
        return str(int(value))
    return None


def as_number(value: Any) -> float | None:
    """A finite number from a number or numeric text, else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def parse_timestamp(value: Any) -> float | None:
    """Seconds since the epoch from a number, numeric text, an ISO-8601 string or a date/datetime
    (naive ones read as UTC, so that one log mixing forms still orders consistently); else None."""
    number = as_number(value)
    if number is not None:
        return number
    if isinstance(value, str):
        text = value.strip()
        if text[-1:] in ("Z", "z"):  # fromisoformat accepts "Z" only from Python 3.11 on
            text = text[:-1] + "+00:00"
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc).timestamp()
    return None


# ---------------------------------------------------------------------------------------------------
# Items and interactions


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
            raise table.error(row, id_field, f"not an item id: {raw_id!r}")
        if item in index:
            raise table.error(row, id_field, f"duplicate item id '{item}' (first at "
                                             f"{_where(table, index[item] - 1)})")
        if not isinstance(raw_title, str):
            raise table.error(row, title_field, f"the title must be text, not {raw_title!r}")
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
        (_first_none(users), "user_id", lambda row: f"not a user id: {raw_users[row]!r}"),
        (_first_none(item_indices), "item_id", lambda row: f"item {raw_items[row]!r} is not in {items_name}"),
        (_first_none(times), "timestamp",
         lambda row: f"not a number or ISO-8601 time: {raw_times[row]!r}"),
        # ratings play no part in the samples, but a non-numeric one means the columns are not what
        # the header says; an empty rating is allowed
        (_first_bad_rating(raw_ratings, ratings), "rating",
         lambda row: f"not a number: {raw_ratings[row]!r}"),
    ]
    bad = [problem for problem in problems if problem[0] is not None]
    if bad:
        row, field, describe = min(bad, key=lambda problem: problem[0])
        raise table.error(row, field, describe(row))
    return Interactions(table.path, users, item_indices, times)  # type: ignore[arg-type]  # no None left


def ids_of(values: list[Any]) -> list[str | None]:
    """`as_id` over a column; text columns (every CSV/TSV one) in one pass."""
    if set(map(type, values)) == {str}:
        return [value.strip() or None for value in values]
    return list(map(as_id, values))


def numbers_of(values: list[Any], parse: Callable[[Any], float | None]) -> list[float | None]:
    """`parse` over a column, after one try at converting the whole column with float() (all finite,
    no booleans); `parse` then runs only on columns holding something else, such as ISO times."""
    if not any(isinstance(value, bool) for value in values):
        try:
            numbers = list(map(float, values))
        except (TypeError, ValueError):
            pass
        else:
            if all(map(math.isfinite, numbers)):
                return numbers  # type: ignore[return-value]
    return list(map(parse, values))


def _first_none(values: list[Any]) -> int | None:
    return next((row for row, value in enumerate(values) if value is None), None)


def _first_bad_rating(raw: list[Any], parsed: list[float | None]) -> int | None:
    return next((row for row, (r, p) in enumerate(zip(raw, parsed)) if p is None and r not in (None, "")),
                None)


# ---------------------------------------------------------------------------------------------------
# Splitting (the one implementation, shared by every loader of raw logs)


@dataclass(frozen=True)
class SplitParts:
    """Users kept (first-appearance order) and their train / valid / test items, each in time order."""

    user_ids: tuple[str, ...]
    train: tuple[tuple[int, ...], ...]
    valid: tuple[tuple[int, ...], ...]
    test: tuple[tuple[int, ...], ...]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")


def split_interactions(interactions: Interactions, split: Split) -> SplitParts:
    """Split a log into per-user train / valid / test parts.

    `chrono` is the paper's: all interactions sorted by (timestamp, log row), the first 80% train, the
    next 10% valid, the rest test (floors computed in integers, so float rounding cannot move a
    boundary). `loo`: per user, the last interaction is test, the one before valid, the rest train; a
    user with two interactions has no valid item, one with a single interaction only a train item.
    Users without a train interaction have no sample and are dropped."""
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

    kept = [u for u, (train, _, _) in enumerate(by_user) if train]
    if len(kept) < len(by_user):
        logger.info("%d of %d users have no training interaction after the %s split and are dropped",
                    len(by_user) - len(kept), len(by_user), split)
    users = list(user_index)
    return SplitParts(
        user_ids=tuple(users[u] for u in kept),
        train=tuple(tuple(by_user[u][0]) for u in kept),
        valid=tuple(tuple(by_user[u][1]) for u in kept),
        test=tuple(tuple(by_user[u][2]) for u in kept),
    )


def build_dataset(interactions: Interactions, items: ItemTable, split: Split, source: str) -> RecDataset:
    """Split validated interactions and assemble the dataset; refuse a split that leaves no sample."""
    parts = split_interactions(interactions, split)
    if not parts.user_ids:
        raise DataError(f"no user has a training interaction after the {split} split "
                        f"({len(interactions.users)} interactions)", file=interactions.path)
    return RecDataset(user_ids=parts.user_ids, item_ids=items.ids, item_titles=items.titles,
                      train=parts.train, valid=parts.valid, test=parts.test, source=source)


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
