"""Cheap structural checks of a dataset folder, meant to run before the full load (the service runs
them at upload time, so that a broken file is refused at once rather than becoming an `invalid`
dataset later).

- Every text file is UTF-8: streamed through an incremental decoder, so memory stays bounded
  whatever the file's size; the first bad byte is named by line and column, and by field for the
  files the layout reads, exactly as the loader names it.
- The layout is recognised (`detect_format`), and every file its loader reads has what the loader
  requires in its header or first line: the required columns (checked with the loaders' own column
  constants and header functions), and for the DEALRec sequence files the ids of the first line.
  Only the first `HEAD_BYTES` of a file are read for this.

Everything further down (bad values, ids missing from items.tsv, duplicates, users out of order) is
left to `load_dataset`. Every error raised here is one `load_dataset` raises too, with the same file,
line and field, with one deliberate exception: a text file the layout does not read (say, a README
or a RecBole `.user` file) must still be UTF-8.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from core.data import dealrec_layout as dealrec
from core.data import interactions as log_tables
from core.data import recbole
from core.data.errors import DataError
from core.data.load import detect_format, interaction_files
from core.data.tables import (
    MAX_LINE_BYTES,
    FieldAt,
    check_header,
    check_parquet_columns,
    delimited_field_at,
    empty_delimited,
    empty_jsonl,
    header_table,
    header_text,
    jsonl_field_at,
    jsonl_row,
    line_too_long,
    malformed_line,
    not_utf8,
    parquet_errors,
    table_kind,
    unreadable_parquet,
)

logger = logging.getLogger(__name__)

# Files checked for UTF-8: every text format an upload may hold (Parquet is binary and checks its own).
TEXT_EXTENSIONS: tuple[str, ...] = (".txt", ".tsv", ".csv", ".jsonl", ".json", ".inter", ".item", ".user")
CHUNK = 1 << 20
# A header or first line must end within this many bytes to be checked here; a longer one is left
# to the full load (so the check stays cheap, and refuses nothing the loader would accept).
HEAD_BYTES = 1 << 20


@dataclass(frozen=True)
class TableSpec:
    """One table a layout's loader reads, and how it reads it (the arguments of `read_table`)."""

    path: Path
    required: tuple[str, ...]
    delimiter: str | None = None  # None: by extension
    quoting: int = csv.QUOTE_MINIMAL
    rename: Callable[[str], str] | None = None
    needs_title: bool = False  # RecBole items: a title field, found by `recbole.title_field`


def precheck(folder: str | Path) -> str:
    """Check a dataset folder's encoding and headers; returns the detected format, or raises the
    DataError (file, line, field) that `load_dataset` would raise for the same problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("not a folder", file=folder)
    fmt = detect_format(folder)
    tables = layout_tables(folder, fmt)
    sequences = [folder / name for name in dealrec.SEQUENCE_FILES] if fmt == "dealrec" else []
    finders: dict[str, FieldAt | None] = {spec.path.name: _table_field_at(spec) for spec in tables}
    finders.update((path.name, dealrec.sequence_field_at) for path in sequences)
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in TEXT_EXTENSIONS and path.is_file():
            check_utf8(path, finders.get(path.name))
    for spec in tables:
        check_table_head(spec)
    check_sequence_heads(sequences)
    logger.debug("precheck of %s (%s) passed", folder, fmt)
    return fmt


def layout_tables(folder: Path, fmt: str) -> list[TableSpec]:
    """The tables the loader of `fmt` reads from `folder`, in the order it reads them."""
    if fmt == "dealrec":
        specs = [TableSpec(folder / dealrec.ITEMS_FILE, dealrec.ITEM_COLUMNS)]
        if (folder / dealrec.USERS_FILE).exists():  # optional, as in the loader
            specs.append(TableSpec(folder / dealrec.USERS_FILE, dealrec.USER_COLUMNS))
        return specs
    if fmt == "recbole":
        inter = recbole.find_inter_file(folder)
        return [_atomic(inter.with_suffix(".item"), recbole.ITEM_COLUMNS, needs_title=True),
                _atomic(inter, recbole.INTER_COLUMNS)]
    log_path, items_path = interaction_files(folder)
    return [TableSpec(items_path, log_tables.ITEM_COLUMNS), TableSpec(log_path, log_tables.LOG_COLUMNS)]


def _atomic(path: Path, required: tuple[str, ...], needs_title: bool = False) -> TableSpec:
    """A RecBole atomic file, read as `recbole._read_atomic` reads it."""
    return TableSpec(path, required, recbole.DELIMITER, recbole.QUOTING, recbole.field_name, needs_title)


def _table_field_at(spec: TableSpec) -> FieldAt | None:
    """How the loader names the field of a bad byte in this table (None: a missing file, which the
    header check then reports, or Parquet)."""
    if not spec.path.is_file():
        return None
    kind = table_kind(spec.path, spec.delimiter)
    if kind == "parquet":
        return None
    return jsonl_field_at if kind == "jsonl" else delimited_field_at(kind, spec.rename)


# ---------------------------------------------------------------------------------------------------
# UTF-8


@dataclass(frozen=True)
class BadByte:
    offset: int  # in the stream fed (after any BOM)
    line: int
    line_start: int  # offset of the first byte of that line
    byte: int

    @property
    def column(self) -> int:
        return self.offset - self.line_start + 1


class Utf8Scanner:
    """Checks a byte stream fed chunk by chunk: an incremental decoder (a multi-byte character may
    straddle two chunks) plus a line count, so the first bad byte is located without ever holding
    more than one chunk."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.offset = 0  # bytes fed so far
        self.newlines = 0
        self.line_start = 0

    def feed(self, chunk: bytes, final: bool = False) -> BadByte | None:
        """The first bad byte in `chunk` (or, when `final`, a character cut off at the end), or None."""
        pending = len(self._decoder.getstate()[0])  # bytes of a character begun in an earlier chunk
        try:
            if pending or final or not chunk.isascii():  # pure ASCII needs no decoding
                self._decoder.decode(chunk, final)
        except UnicodeDecodeError as exc:
            # exc.object is the pending bytes followed by the chunk; they hold no newline
            return self._locate(exc.object, exc.start, self.offset - pending)
        last_newline = chunk.rfind(b"\n")
        if last_newline >= 0:
            self.newlines += chunk.count(b"\n")
            self.line_start = self.offset + last_newline + 1
        self.offset += len(chunk)
        return None

    def _locate(self, data: bytes, at: int, base: int) -> BadByte:
        last_newline = data.rfind(b"\n", 0, at)
        line_start = base + last_newline + 1 if last_newline >= 0 else self.line_start
        return BadByte(offset=base + at, line=self.newlines + data.count(b"\n", 0, at) + 1,
                       line_start=line_start, byte=data[at])


def check_utf8(path: Path, field_at: FieldAt | None = None) -> None:
    """Raise the loader's DataError for the first byte of `path` that is not UTF-8. A leading BOM is
    skipped, as the loader drops it, so lines and columns count the same."""
    scanner = Utf8Scanner()
    with _open(path) as f:
        bom = len(codecs.BOM_UTF8) if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
        f.seek(bom)
        bad = None
        for chunk in _chunks(f):
            bad = scanner.feed(chunk)
            if bad:
                break
        else:
            bad = scanner.feed(b"", final=True)
        if bad is None:
            return
        field = _field_of(f, bom, bad, field_at) if field_at else None
    raise not_utf8(path, bad.byte, bad.line, bad.column, field)


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def _field_of(f: IO[bytes], bom: int, bad: BadByte, field_at: FieldAt) -> str | None:
    """The loader's field for the bad byte, from the header line and the bad line up to that byte,
    read back from the file; None when either is longer than `HEAD_BYTES` (memory stays bounded)."""
    f.seek(bom)
    header = f.readline(HEAD_BYTES + 1)
    if len(header) > HEAD_BYTES or bad.column - 1 > HEAD_BYTES:
        return None
    f.seek(bom + bad.line_start)
    prefix = f.read(bad.column - 1)
    return field_at(header_text(header.split(b"\n", 1)[0]), bad.line, prefix)


# ---------------------------------------------------------------------------------------------------
# Headers and first lines


def check_table_head(spec: TableSpec) -> None:
    """The table's required columns (Parquet: from its footer; JSONL: the keys of the first object).
    Run after `check_utf8`: the header is decoded without a second check."""
    kind = table_kind(spec.path, spec.delimiter)  # a missing file: the loader's "file not found"
    if kind == "parquet":
        _check_parquet(spec)
        return
    text, complete = _head(spec.path)
    if kind == "jsonl":
        _check_jsonl_head(spec, text, complete)
        return
    header = _delimited_header(spec, kind, text, complete)
    if header is not None and spec.needs_title:
        recbole.title_field(header_table(spec.path, header))


def _head(path: Path) -> tuple[str, bool]:
    """The file's first whole lines (at most `HEAD_BYTES`, BOM dropped) and whether that is the whole
    file. A line cut off by the limit is left out: a check must never see half a line. A first line
    longer than the loaders' MAX_LINE_BYTES is refused here (the loader refuses it too)."""
    with _open(path) as f:
        data = f.read(HEAD_BYTES + 1)
    complete = len(data) <= HEAD_BYTES
    data = data.removeprefix(codecs.BOM_UTF8)
    if len(data) > MAX_LINE_BYTES and b"\n" not in data[:MAX_LINE_BYTES + 1]:
        raise line_too_long(path, 1)
    if not complete:
        data = data[:data.rfind(b"\n") + 1]
    return data.decode("utf-8", "replace"), complete  # check_utf8 ran first: nothing to replace


def _delimited_header(spec: TableSpec, delimiter: str, text: str, complete: bool) -> tuple[str, ...] | None:
    """The first non-blank row, checked as the loader checks it; None when it does not end within
    the bytes read (the full load checks it then)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=spec.quoting, strict=True)
    rename = spec.rename or (lambda name: name)
    end = 0
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            return check_header(spec.path, [rename(name.strip()) for name in row], spec.required, start)
    except csv.Error as exc:
        if not complete:  # a quoted field may go on past the bytes read
            return None
        raise malformed_line(spec.path, exc, reader.line_num) from None
    if complete:
        raise empty_delimited(spec.path, spec.required)
    return None


def _check_jsonl_head(spec: TableSpec, text: str, complete: bool) -> None:
    for number, raw in enumerate(text.split("\n"), start=1):
        if raw.strip():
            jsonl_row(spec.path, number, raw, spec.required)
            return
    if complete:
        raise empty_jsonl(spec.path, spec.required)


def _check_parquet(spec: TableSpec) -> None:
    import pyarrow as pa  # imported here: only Parquet needs it, and it is slow to import
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(spec.path) as parquet:  # reads the footer (schema, row count) only
            names, rows = parquet.schema_arrow.names, parquet.metadata.num_rows
    except parquet_errors(pa) as exc:
        raise unreadable_parquet(spec.path, exc) from None
    check_parquet_columns(spec.path, names, rows, spec.required)


def check_sequence_heads(paths: list[Path]) -> None:
    """The DEALRec sequence files' first lines: ids that are positive integers and the same first
    user in every file (an empty training line is a user without a sample: allowed). (Whether the
    items exist in items.tsv needs all of items.tsv: the full load's job.) Run after `check_utf8`, as
    `check_table_head`."""
    first_user: int | None = None
    for path in paths:
        line = _first_sequence_line(path)
        if line is None:
            continue
        user, _ = dealrec.parse_sequence_line(path, 1, line, None)
        if path.name == dealrec.TRAIN_FILE:
            first_user = user
        elif first_user is not None and user != first_user:
            raise dealrec.misaligned_user(path, 1, user, first_user)


def _first_sequence_line(path: Path) -> str | None:
    """Line 1 as the loader sees it, or None when that cannot be told from the bytes read. A blank
    line 1 is returned as is (the parser refuses it) unless the file is blank throughout (empty)."""
    text, complete = _head(path)  # a missing file: the loader's "file not found"
    lines = text.split("\n")
    if lines[0].strip():
        return lines[0]
    if any(line.strip() for line in lines):
        return lines[0]
    if complete:
        raise dealrec.empty_sequence_file(path)
    return None


def _open(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError("file not found", file=path) from None
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror or exc}", file=path) from None
