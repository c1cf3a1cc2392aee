"""One entry point for every dataset layout: `load_dataset(path)` finds out which layout a path holds
and returns the `RecDataset`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from core.data.dataset import RecDataset
from core.data.dealrec_layout import ITEMS_FILE, TEST_FILE, TRAIN_FILE, USERS_FILE, VALID_FILE, load_dealrec_layout
from core.data.errors import DataError
from core.data.interactions import load_interaction_log
from core.data.recbole import load_recbole
from core.data.split import Split, check_split
from core.data.tables import TABLE_EXTENSIONS

logger = logging.getLogger(__name__)

Format = Literal["auto", "dealrec", "interactions", "recbole"]
FORMATS: tuple[str, ...] = ("dealrec", "interactions", "recbole")

_EXTS = "{" + ",".join(ext.lstrip(".") for ext in TABLE_EXTENSIONS) + "}"
LOOKED_FOR = (
    f"a DEALRec folder ({TRAIN_FILE}, {VALID_FILE}, {TEST_FILE}, {ITEMS_FILE}, optional {USERS_FILE}); "
    f"a RecBole folder or .inter file (<name>.inter with <name>.item); "
    f"an interaction-log folder (interactions.{_EXTS} with items.{_EXTS})"
)


def detect_format(path: str | Path) -> str:
    """Which layout `path` holds: "dealrec", "recbole" or "interactions". A path that matches none, or
    several (which one was meant cannot be guessed), is a DataError saying what was looked for."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file or folder; expected {LOOKED_FOR}", file=path)
    found = [name for name, matches in (("dealrec", _is_dealrec), ("interactions", _is_interaction_log),
                                        ("recbole", _is_recbole)) if matches(path)]
    if not found:
        raise DataError(f"no dataset layout recognised; looked for {LOOKED_FOR}", file=path)
    if len(found) > 1:
        raise DataError(f"holds several dataset layouts ({', '.join(found)}); choose one with fmt=",
                        file=path)
    return found[0]


def load_dataset(path: str | Path, fmt: Format = "auto", split: Split = "chrono",
                 limit_users: int | None = None) -> RecDataset:
    """Load the dataset at `path` (folder, or a RecBole `.inter` file), in the given or detected layout.

    `split` applies to raw logs (interaction logs, RecBole); the DEALRec layout is already split
    chronologically, so asking it for "loo" is refused rather than silently ignored. `limit_users`
    keeps the first n users (all items, so indices do not change)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"fmt must be auto or one of {', '.join(FORMATS)}, not {fmt!r}")
    check_split(split)
    if limit_users is not None and limit_users < 1:
        raise ValueError("limit_users must be at least 1")
    path = Path(path)
    kind = detect_format(path) if fmt == "auto" else fmt
    logger.debug("loading %s as %s", path, kind)
    if kind == "dealrec":
        if split != "chrono":
            raise ValueError(f"the DEALRec layout is already split chronologically; split={split!r} "
                             "applies to interaction logs and RecBole files")
        ds = load_dealrec_layout(path)
    elif kind == "recbole":
        ds = load_recbole(path, split)
    else:
        ds = load_interaction_log(*interaction_files(path), split=split)
    return ds.limit_users(limit_users)


def interaction_files(path: Path) -> tuple[Path, Path]:
    """The (log, items) pair of an interaction-log folder, or of a log file named interactions.<ext>
    with its items table beside it."""
    folder = path.parent if path.is_file() else path
    logs = [path] if path.is_file() else _tables(folder, "interactions")
    items = _tables(folder, "items")
    for name, found in (("interactions", logs), ("items", items)):
        if len(found) != 1:
            what = "no" if not found else f"several ({', '.join(p.name for p in found)})"
            raise DataError(f"{what} {name}.{_EXTS} file; expected exactly one", file=folder)
    return logs[0], items[0]


def _tables(folder: Path, stem: str) -> list[Path]:
    return [folder / f"{stem}{ext}" for ext in TABLE_EXTENSIONS if (folder / f"{stem}{ext}").is_file()]


def _is_dealrec(path: Path) -> bool:
    return (path / TRAIN_FILE).is_file()


def _is_recbole(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".inter"
    return any(p.is_file() for p in path.glob("*.inter"))


def _is_interaction_log(path: Path) -> bool:
    if path.is_file():
        return (path.stem == "interactions" and path.suffix in TABLE_EXTENSIONS
                and bool(_tables(path.parent, "items")))
    return bool(_tables(path, "interactions")) and bool(_tables(path, "items"))
