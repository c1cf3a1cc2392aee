"""Client file names -> safe names inside a folder we chose. A client's name never becomes a path:
only its last component survives, reduced to [A-Za-z0-9._-], with an allowed extension."""

from __future__ import annotations

import re

from app.errors import ApiError

# What core's loaders read (DEALRec layout, interaction logs, RecBole atomic files).
DATA_EXTENSIONS = (".txt", ".tsv", ".csv", ".jsonl", ".json", ".parquet", ".inter", ".item", ".user")
ARCHIVE_EXTENSIONS = (".zip", ".tar.gz", ".tgz")
# Formats that execute code or carry arbitrary objects when loaded: refused outright.
REFUSED_EXTENSIONS = (".npy", ".npz", ".pkl", ".pickle", ".pt", ".pth", ".joblib", ".ckpt", ".bin")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_NAME = 128


def refused_magic(head: bytes) -> bool:
    """NumPy arrays and pickles, whatever their name claims (pickle protocol 2+ starts with 0x80 n)."""
    return head.startswith(b"\x93NUMPY") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_EXTENSIONS)


def safe_name(raw: str, *, allow_archives: bool) -> str:
    """The file name to store `raw` under, or a 4xx ApiError saying why it is refused."""
    base = re.split(r"[/\\]", raw or "")[-1].strip()
    name = _UNSAFE.sub("_", base)[:MAX_NAME]
    shown = base[:MAX_NAME] or "(empty)"
    if not name or name.startswith("."):
        raise ApiError(400, "invalid_filename", f"file name '{shown}' is empty or hidden", file=shown)
    lower = name.lower()
    if lower.endswith(REFUSED_EXTENSIONS):
        raise ApiError(415, "unsupported_file_type",
                       f"'{shown}': NumPy and pickle files are refused (they can run code when loaded)", file=shown)
    allowed = DATA_EXTENSIONS + (ARCHIVE_EXTENSIONS if allow_archives else ())
    if not lower.endswith(allowed):
        raise ApiError(415, "unsupported_file_type",
                       f"'{shown}': expected one of {', '.join(allowed)}", file=shown)
    return name
