"""Where artifacts live on disk, under the storage root shared by the API and the workers:

    <root>/datasets/<id>/files/     the uploaded dataset, as core loads it
    <root>/jobs/<id>/               a finished job's selection.json/.csv, scores.csv, bigrec_train.jsonl,
                                    diagnostics.json
    <root>/tmp/                     uploads and job outputs being written (renamed into place when complete)
    <root>/cache/                   core's content-addressed stage cache (default; DEALREC_CACHE_DIR)

Only ids the store generated (checked by `is_valid_id`) ever become folder names.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from worker.service.jobstore import is_valid_id

log = logging.getLogger(__name__)

JOB_FILES = ("selection.json", "selection.csv", "scores.csv", "bigrec_train.jsonl", "diagnostics.json",
             "adapter.tar.gz", "metrics.json")


class Files:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _checked(self, kind: str, ident: str) -> str:
        if not is_valid_id(kind, ident):
            raise ValueError(f"not a {kind} id: {ident!r}")
        return ident

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.root / "datasets" / self._checked("ds", dataset_id)

    def dataset_files(self, dataset_id: str) -> Path:
        return self.dataset_dir(dataset_id) / "files"

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / self._checked("job", job_id)

    def job_file(self, job_id: str, name: str) -> Path:
        if name not in JOB_FILES:
            raise ValueError(f"not a job artifact: {name!r}")
        return self.job_dir(job_id) / name

    def tmp_dir(self, label: str) -> Path:
        """A fresh private folder on the same file system as the final places (so rename is atomic)."""
        base = self.root / "tmp"
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{label}-", dir=base))

    def publish(self, tmp: Path, final: Path) -> None:
        """Move a completed folder into place in one rename; an older copy (a redelivered job that
        had already published) is replaced."""
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            old = final.with_name(final.name + f".old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)

    @staticmethod
    def remove(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    PAIRING_FILE = ".store-id"

    def paired(self, store) -> bool:
        """Whether `store` (a JobStore) holds the records of this folder, i.e. whether "no record"
        there means "expired or deleted" here. A random id is written on both sides the first time
        (a new service, or one from before this check); after that a store with no id while the
        folder has one is a Redis that lost its data (a restart without persistence, a flush, an
        empty replica) or another key prefix or database: everything would look orphaned, so nothing
        is swept (an error is logged instead). A folder without its file adopts the store's id."""
        marker = self.root / self.PAIRING_FILE
        if not marker.is_file():
            theirs = store.data_pairing(secrets.token_hex(16))
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = marker.with_name(f"{marker.name}.{os.getpid()}")
            tmp.write_text(theirs + "\n")
            os.replace(tmp, marker)
            return True
        mine, theirs = marker.read_text().strip(), store.recorded_pairing()
        if theirs != mine:
            log.error("storage not swept: the store's records do not belong to %s (it records %s, the folder %s): "
                      "an emptied Redis, or another key prefix or database; remove %s only if this folder's data "
                      "is to be dropped", self.root, theirs or "no folder", mine, marker)
            return False
        return True

    def sweep(self, job_exists, dataset_exists, tmp_max_age_s: float = 15 * 60) -> int:
        """Remove job folders whose records expired, dataset folders whose records are gone, and stale
        temporary folders (`sweep_tmp`). Returns how many folders went. A folder is removed only once
        nothing in it changed for `tmp_max_age_s` too (a second guard: records are written before their
        folders, so a live one always has its record). The caller checks `paired` first."""
        removed = 0
        cutoff = time.time() - tmp_max_age_s
        for kind, sub, exists in (("job", "jobs", job_exists), ("ds", "datasets", dataset_exists)):
            folder = self.root / sub
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if is_valid_id(kind, entry.name) and not exists(entry.name) and not _changed_since(entry, cutoff):
                    self.remove(entry)
                    removed += 1
        removed += self.sweep_tmp(tmp_max_age_s)
        if removed:
            log.info("storage sweep removed %d folders", removed)
        return removed

    def sweep_tmp(self, max_age_s: float) -> int:
        """Remove what lies in `tmp/` (partial uploads of an API that died, outputs of a job whose
        worker died) once nothing in it changed for `max_age_s`: the newest modification time
        anywhere inside counts, so an upload whose file still grows is kept however long it takes."""
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return 0
        cutoff = time.time() - max_age_s
        removed = 0
        for entry in tmp.iterdir():
            try:
                if _changed_since(entry, cutoff):
                    continue
                self.remove(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
                removed += 1
                log.info("removed the stale temporary %s", entry.name)
            except OSError:  # gone meanwhile (its upload finished), or unreadable: the next sweep looks again
                continue
        return removed


def _changed_since(path: Path, cutoff: float) -> bool:
    """Whether `path` or anything below it (links not followed) was modified after `cutoff`."""
    if path.lstat().st_mtime >= cutoff:
        return True
    if not path.is_dir() or path.is_symlink():
        return False
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    return True
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
    return False
