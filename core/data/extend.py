"""A new version of a dataset: the old one's files with new rows appended.

Recommendation data keeps arriving: new users (new lines in the DEALRec layout's three sequence
files and users.tsv), new interactions (new rows of an interaction log), new items (new rows of the
items table). A version is written as a complete dataset of its own (every loader reads it as is);
the old one is left untouched. A file of the addition with the name of an old file is appended to it
(its first line is dropped when it repeats the old file's first line: a header sent again); a file
with a new name is added as it is. Text tables only: Parquet files are read and written whole.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from core.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".inter", ".item", ".user")


def _files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(Path(folder).iterdir()) if p.is_file() and not p.name.startswith(".")}


def _first_line(data: bytes) -> bytes:
    return data.split(b"\n", 1)[0].rstrip(b"\r")


def extend_files(base: Path, addition: Path, out: Path) -> list[str]:
    """Write `out` = the dataset folder `base` with the files of `addition` appended (or added).
    Returns the names of the files that changed. Raises DataError for a file that cannot be appended."""
    base_files, added = _files(base), _files(addition)
    if not added:
        raise DataError("the addition holds no file", file=str(addition))
    out.mkdir(parents=True, exist_ok=False)
    changed = []
    for name, path in base_files.items():
        if name not in added:
            shutil.copyfile(path, out / name)
    for name, extra in added.items():
        target = out / name
        if name not in base_files:
            shutil.copyfile(extra, target)
        elif name.endswith(".parquet"):
            _append_parquet(base_files[name], extra, target)
        elif name.endswith(TEXT_SUFFIXES):
            old, new = base_files[name].read_bytes(), extra.read_bytes()
            if new and old and _first_line(new) == _first_line(old):
                new = new.split(b"\n", 1)[1] if b"\n" in new else b""
            if old and not old.endswith(b"\n"):
                old += b"\n"
            target.write_bytes(old + new)
        else:
            raise DataError("only text tables (.txt .csv .tsv .jsonl, RecBole atomic files) and Parquet files "
                            "can be appended to", file=name)
        changed.append(name)
    return changed


def _append_parquet(old: Path, extra: Path, target: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.concat_tables([pq.read_table(old), pq.read_table(extra)])
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot append: {exc}", file=extra.name) from None
    pq.write_table(table, target)
