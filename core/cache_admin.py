"""What the content-addressed cache holds, and removing what has not been used for a while
(`dealrec cache`). Nothing in the pipeline ever deletes a cache entry: every new dataset version,
model or setting adds one, so a long-lived cache only shrinks through here.

An entry is one folder: `<kind>-<hash>/` at the top (surrogate, influence, effort, items-bigrec, ...),
or one folder under `llm/` (a de-quantised model) or `effort-store/` (the per-sample effort scores of
one configuration). Its last use is the newest access or modification time of the files in it: reads
update access times (at least daily on the usual `relatime` mounts), so an entry read last week
counts as used last week; on a `noatime` mount it is the time it was written.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Folders whose sub-folders are the entries, and the exact names those entries have (the LLM's content
# key, core/effort/llm.py; the score store's cache_key): a folder of any other name under them (a
# model a person keeps in a folder called llm/, should --cache-dir point above it) is never an entry.
NESTED = {"llm": re.compile(r"[0-9a-f]{16}"), "effort-store": re.compile(r"effort-store-[0-9a-f]{20}")}
# The other entries are top-level `<kind>-<hash>` folders (core.cache.cache_key).
_KEYED = re.compile(r"(?P<kind>[a-z][a-z0-9-]*)-[0-9a-f]{20}")
DAY_S = 24 * 3600


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    kind: str
    bytes: int
    last_used: float  # seconds since the epoch


def _usage(folder: Path) -> tuple[int, float]:
    """(bytes, newest use) of everything under `folder` (links not followed): a file's access or
    modification time, a folder's modification time only (listing a folder, as this does, sets its
    access time: counting that would make every entry look used by the last listing)."""
    size, newest = 0, 0.0
    stack = [folder]
    while stack:
        current = stack.pop()
        st = current.lstat()
        newest = max(newest, st.st_mtime)
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    else:
                        est = entry.stat(follow_symlinks=False)
                        size += est.st_size
                        newest = max(newest, est.st_atime, est.st_mtime)
        except NotADirectoryError:
            size += st.st_size
    return size, newest


def cache_entries(root: Path) -> list[CacheEntry]:
    """Every entry under `root`, in name order; what is not an entry (a temporary file being written,
    something a person put there) is not listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: list[CacheEntry] = []
    for top in sorted(root.iterdir()):
        if top.name.startswith(".") or not top.is_dir() or top.is_symlink():
            continue
        if top.name in NESTED:
            candidates = [(p, top.name) for p in sorted(top.iterdir())
                          if p.is_dir() and not p.is_symlink() and NESTED[top.name].fullmatch(p.name)]
        elif (m := _KEYED.fullmatch(top.name)) is not None:
            candidates = [(top, m.group("kind"))]
        else:
            continue
        for path, kind in candidates:
            try:
                size, last = _usage(path)
            except FileNotFoundError:  # removed meanwhile
                continue
            found.append(CacheEntry(path, kind, size, last))
    return found


def stale_entries(entries: Iterable[CacheEntry], older_than_days: float, kinds: Iterable[str] = (),
                  now: float | None = None) -> list[CacheEntry]:
    """The entries (of `kinds`, all when empty) not used for `older_than_days`."""
    cutoff = (time.time() if now is None else now) - older_than_days * DAY_S
    wanted = set(kinds)
    return [e for e in entries if e.last_used < cutoff and (not wanted or e.kind in wanted)]


def remove_entry(entry: CacheEntry) -> None:
    """Rename the folder aside first (one atomic step: a reader that looks for the entry afterwards
    finds it absent and recomputes it; open files stay readable), then delete it."""
    trash = entry.path.with_name(f".removing-{entry.path.name}-{os.getpid()}")
    try:
        os.rename(entry.path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            break
    return f"{n:.1f} {unit}"
