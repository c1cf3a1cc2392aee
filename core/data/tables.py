"""Reading files as tables (CSV, TSV, Parquet, JSONL), shared by every loader and by the precheck.

Each table is read so that every bad value can be reported by file, line (or Parquet row) and column;
the header checks, the error for a byte that is not UTF-8 and the field that holds it are the same
ones the precheck uses, so both name a problem alike.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.data.errors import DataError, shown

TABLE_EXTENSIONS: tuple[str, ...] = (".csv", ".tsv", ".parquet", ".jsonl")

# (header line, line number, bytes of that line before the bad byte) -> name of the field holding it
FieldAt = Callable[[str, int, bytes], "str | None"]


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
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        prefix = data[line_start:exc.start][-MAX_LINE_BYTES:]
        header = header_text(data[:MAX_LINE_BYTES].split(b"\n", 1)[0])
        field = field_at(header, line, prefix) if field_at else None
        raise not_utf8(path, data[exc.start], line, exc.start - line_start + 1, field) from None
    check_line_lengths(path, data)
    return text


# The longest line any loader reads (a row, a header, a user's sequence); the upload check refuses a
# longer first line at once. Longer is no data (a user with 100,000+ items on one line, a 1 MiB id).
MAX_LINE_BYTES = 1 << 20


def check_line_lengths(path: Path, data: bytes) -> None:
    """The first line of `data` longer than MAX_LINE_BYTES, as a DataError (vectorised: a log has
    millions of lines)."""
    if len(data) <= MAX_LINE_BYTES:
        return
    import numpy as np

    breaks = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
    lengths = np.diff(breaks, prepend=-1, append=len(data)) - 1
    long = np.flatnonzero(lengths > MAX_LINE_BYTES)
    if long.size:
        raise line_too_long(path, int(long[0]) + 1)


def line_too_long(path: Path, line: int) -> DataError:
    return DataError(f"the line is longer than {MAX_LINE_BYTES:,} bytes", file=path, line=line)


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
            raise DataError(f"column {shown(name)} appears twice in the header", file=path, line=line, field=name)
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
    except RecursionError:  # arrays or objects nested thousands deep: no row of a table
        raise too_deep(path, number, raw, required) from None
    if not isinstance(obj, dict):
        raise DataError("each line must hold one JSON object", file=path, line=number)
    for name in required:
        if name not in obj:
            raise DataError(f"missing key '{name}'", file=path, line=number, field=name)
    return obj


def too_deep(path: Path, number: int, raw: str, required: Sequence[str]) -> DataError:
    """A JSONL line nested too deeply to parse: the key under which it happens (else the row's first
    required key) and the column where the nesting passes MAX_JSON_DEPTH."""
    depth, column, quoted, escaped = 0, None, False, False
    for i, ch in enumerate(raw):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                column = i + 1
                break
        elif ch in "]}":
            depth -= 1
    prefix = raw[:column or len(raw)].encode("utf-8", "replace")
    field = jsonl_field_at("", number, prefix) or (required[0] if required else None)
    return DataError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep (column {column})", file=path,
                     line=number, field=field)


# A table's row holds flat values; nesting this deep is never data (and Python's parser stops near 1000).
MAX_JSON_DEPTH = 100


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
