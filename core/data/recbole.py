"""RecBole atomic files: `<name>.inter` (interactions) and `<name>.item` (items), tab-separated, with
header fields written `name:type` (`user_id:token`, `timestamp:float`, `title:token_seq`, ...).

The files are read as plain tab-separated text, as RecBole reads them: quotes are ordinary characters.
Splitting is the one implementation in `split.py`.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

from core.data.dataset import RecDataset
from core.data.errors import DataError
from core.data.interactions import LOG_COLUMNS, read_interactions, read_items
from core.data.split import Split, build_dataset, check_split
from core.data.tables import Table, read_table

logger = logging.getLogger(__name__)

INTER_COLUMNS: tuple[str, ...] = LOG_COLUMNS
ITEM_COLUMNS: tuple[str, ...] = ("item_id",)  # plus a title field, found by `title_field`
DELIMITER = "\t"
QUOTING = csv.QUOTE_NONE  # as RecBole reads them: quotes are ordinary characters


def load_recbole(folder_or_inter_path: Path, split: Split = "chrono") -> RecDataset:
    """Load a RecBole dataset from its folder (`<folder>/<folder>.inter`, or the folder's only `.inter`)
    or from the `.inter` file itself; the items come from the `.item` file beside it."""
    check_split(split)
    started = time.perf_counter()
    inter_path = find_inter_file(Path(folder_or_inter_path))
    item_path = inter_path.with_suffix(".item")
    items_table = _read_atomic(item_path, ITEM_COLUMNS)
    items = read_items(items_table, title_field=title_field(items_table))
    interactions = read_interactions(_read_atomic(inter_path, INTER_COLUMNS), items, item_path.name)
    ds = build_dataset(interactions, items, split, source=f"recbole:{inter_path}")
    logger.info("loaded RecBole %s (%s split): %d users, %d items, %d interactions in %.2f s", inter_path,
                split, ds.n_users, ds.n_items, len(interactions.users), time.perf_counter() - started)
    return ds


def find_inter_file(path: Path) -> Path:
    """The `.inter` file a path names: itself, `<folder>/<folder>.inter`, or a folder's only `.inter`."""
    if path.is_file():
        if path.suffix != ".inter":
            raise DataError("not a RecBole .inter file", file=path)
        return path
    if not path.is_dir():
        raise DataError("no such file or folder", file=path)
    named = path / f"{path.name}.inter"
    if named.is_file():
        return named
    found = sorted(p for p in path.glob("*.inter") if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError("no RecBole .inter file in this folder", file=path)
    raise DataError(f"several .inter files ({', '.join(p.name for p in found)}) and none named "
                    f"{named.name}; pass the .inter file itself", file=path)


def title_field(table: Table) -> str:
    """The item file's title field: `title` itself, else the first field whose name contains 'title'
    (RecBole's MovieLens files call it `movie_title`)."""
    if table.has("title"):
        return "title"
    for name in table.header:
        if "title" in name.lower():
            return name
    raise table.missing_column("title", " (or a field whose name contains 'title', "
                                        "e.g. movie_title:token_seq)")


def _read_atomic(path: Path, required: tuple[str, ...]) -> Table:
    """One atomic file, its `name:type` header fields known by their names alone."""
    return read_table(path, required, delimiter=DELIMITER, quoting=QUOTING, rename=field_name)


def field_name(header_field: str) -> str:
    """`user_id:token` -> `user_id`."""
    return header_field.split(":", 1)[0]
