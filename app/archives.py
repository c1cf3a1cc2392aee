"""Unpacks an uploaded `.zip` / `.tar.gz` into a flat folder, refusing anything unsafe.

Members are read one by one and copied with a byte counter: never `extractall`, never a member
name used as a path. Refused: absolute or `..` paths, symlinks and hard links, devices, more than
`max_files` files, more than `max_bytes` unpacked or more than `max_ratio` times the archive's own
size (a zip bomb; both counted while copying, so a lying header does not help, and nothing past the
limit is written), files in more than one folder, two files with one name."""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from app.errors import ApiError, too_many_files
from app.filenames import refused_magic, safe_name
from worker.service.records import FileInfo

CHUNK = 1 << 20
# The compression ratio counts past this many unpacked bytes only: a tiny archive of repetitive text
# (a few KiB that unpack to a few hundred) is no bomb.
RATIO_FLOOR = 1 << 20


def _bad(message: str, **extra) -> ApiError:
    return ApiError(400, "unsafe_archive", message, **extra)


def _check_member_path(name: str) -> PurePosixPath | None:
    """The member's path, or None for entries we skip (macOS metadata, hidden files)."""
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise _bad(f"archive member '{name[:200]}' has an absolute or Windows path", member=name[:200])
    path = PurePosixPath(name)
    if any(part == ".." for part in path.parts):
        raise _bad(f"archive member '{name[:200]}' points outside the archive", member=name[:200])
    if path.parts and (path.parts[0] == "__MACOSX" or any(p.startswith(".") for p in path.parts if p != ".")):
        return None
    return path


def _members(archive: Path) -> Iterator[tuple[str, int, str, Callable[[], IO[bytes]]]]:
    """(name, declared size, kind, opener) per member; kind is file, dir, link or other."""
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                mode = info.external_attr >> 16
                ftype = stat.S_IFMT(mode)  # 0 when the archiver recorded permissions only
                kind = ("dir" if info.is_dir() else "link" if stat.S_ISLNK(mode)
                        else "other" if ftype and not stat.S_ISREG(mode) else "file")
                yield info.filename, info.file_size, kind, (lambda i=info: zf.open(i))
    else:
        with tarfile.open(archive, mode="r:gz") as tf:
            for m in tf:  # streams: members are read in order, the archive is never listed whole
                kind = ("dir" if m.isdir() else "link" if (m.issym() or m.islnk())
                        else "file" if m.isfile() else "other")
                yield m.name, m.size, kind, (lambda m=m: tf.extractfile(m))


def unpack(archive: Path, dest: Path, max_bytes: int, max_files: int, max_ratio: float | None = None
           ) -> list[FileInfo]:
    dest.mkdir(parents=True, exist_ok=True)
    files: list[FileInfo] = []
    total = 0
    folder: PurePosixPath | None = None
    budget = _Budget(max_bytes, max_ratio, archive.stat().st_size)
    try:
        for name, size, kind, opener in _members(archive):
            path = _check_member_path(name)
            if kind == "link":
                raise _bad(f"archive member '{name[:200]}' is a link; links are refused", member=name[:200])
            if kind == "other":
                raise _bad(f"archive member '{name[:200]}' is not a regular file", member=name[:200])
            if path is None or kind == "dir":
                continue
            if folder is None:
                folder = path.parent
            elif path.parent != folder:
                raise _bad("the archive must hold one dataset folder; found files in "
                           f"'{folder}' and '{path.parent}'")
            if len(files) >= max_files:
                raise too_many_files("the archive", max_files, "DEALREC_MAX_ARCHIVE_FILES")
            room, over = budget.room(total)
            if size > room:  # the declared size already says so
                raise over
            out_name = safe_name(path.name, allow_archives=False)
            target = dest / out_name
            if target.exists():
                raise _bad(f"the archive holds two files named '{out_name}'", file=out_name)
            written = _copy(opener, target, room, over, out_name)
            total += written
            files.append(FileInfo(name=out_name, bytes=written))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, RuntimeError, NotImplementedError) as exc:
        raise ApiError(400, "bad_archive", f"cannot read the archive: {exc}") from None
    if not files:
        raise ApiError(400, "empty_archive", "the archive holds no data files")
    return files


class _Budget:
    """How many more bytes the archive may unpack to, and the error past them: the size limit, or
    the ratio to the archive's own size, whichever comes first."""

    def __init__(self, max_bytes: int, max_ratio: float | None, archive_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.too_large = ApiError(413, "archive_too_large", f"the archive unpacks to more than {max_bytes} bytes "
                                  "(DEALREC_MAX_UNPACKED_BYTES)", limit=max_bytes, setting="DEALREC_MAX_UNPACKED_BYTES")
        self.max_ratio_bytes: int | None = None
        if max_ratio:
            self.max_ratio_bytes = max(int(max_ratio * archive_bytes), RATIO_FLOOR)
            self.too_compressed = ApiError(
                413, "archive_too_compressed", f"the archive unpacks to more than {max_ratio:g} times its own "
                f"{archive_bytes} bytes (DEALREC_MAX_ARCHIVE_RATIO): refused as a likely zip bomb", limit=max_ratio,
                setting="DEALREC_MAX_ARCHIVE_RATIO", archive_bytes=archive_bytes)

    def room(self, unpacked: int) -> tuple[int, ApiError]:
        by_size = self.max_bytes - unpacked
        if self.max_ratio_bytes is not None and self.max_ratio_bytes - unpacked < by_size:
            return self.max_ratio_bytes - unpacked, self.too_compressed
        return by_size, self.too_large


def _copy(opener: Callable[[], IO[bytes]], target: Path, budget: int, over: ApiError, shown: str) -> int:
    """Copy one member, raising `over` as soon as it passes `budget` bytes (before writing them)."""
    written = 0
    src = opener()
    try:
        with open(target, "xb") as out:
            while chunk := src.read(CHUNK):
                if written == 0 and refused_magic(chunk[:8]):
                    raise ApiError(415, "unsupported_file_type",
                                   f"'{shown}' is a NumPy or pickle file; those are refused", file=shown)
                written += len(chunk)
                if written > budget:
                    raise over
                out.write(chunk)
    finally:
        src.close()
    if written == 0:
        raise ApiError(400, "empty_file", f"'{shown}' is empty", file=shown)
    return written


def clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
