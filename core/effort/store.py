"""The per-sample effort store: each sample's effort score kept under what it depends on, so that a
pool whose prompts were scored before costs nothing and a pool with new samples pays only for those.

Layout, under a storage root (core's cache folder, or the service's data dir shared by every worker):

    effort-store/<config key>/seg-<time>-<host>-<pid>-<random>.npz

`<config key>` holds everything a score depends on besides the prompt: the LLM's identity, the
adapter's (its files' content, not its path), the LoRA seed and settings, the effort options (the
loss), the prompt template and cutoff, and the precision class. A sample is keyed by the hash of its
rendered prompt, i.e. its token ids after the cut, so the same user in a larger (or shuffled, or
extended) pool finds its score again, and a user whose history changed does not.

Writes are whole segment files, written under a temporary name and renamed: a reader sees a segment
completely or not at all, and any number of processes on any number of machines can insert at once
(names never collide; there is no read-modify-write). Each segment carries a digest of its arrays: a
damaged file (a disk error, a copy cut short) fails it, is moved aside as `*.corrupt` and never read,
and its samples are simply scored again.

Length correction and normalisation are pool-level steps applied after the lookup, so they stay
exact whatever the store held.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.cache import atomic_write_bytes

log = logging.getLogger(__name__)

KEY_BYTES = 16
FORMAT = 1


def sample_key(ids: Sequence[int]) -> bytes:
    """A sample's identity in the store: the hash of its token ids (the rendered, cut prompt)."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).digest()[:KEY_BYTES]


def file_digest(folder: str | Path | None) -> str | None:
    """The content of an adapter folder (or any folder) as one hash; None for no folder."""
    if not folder:
        return None
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:20]


def _digest(keys: np.ndarray, values: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(keys).tobytes())
    h.update(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    return h.hexdigest()


class ScoreStore:
    """The effort scores of one configuration (`config_key`) under `root`. Lookups read the
    segments written since the last lookup; inserts write one new segment."""

    def __init__(self, root: Path, config_key: str) -> None:
        self.folder = Path(root) / "effort-store" / config_key
        self._index: dict[bytes, float] = {}
        self._seen: set[str] = set()

    # -- reading ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the segments not read yet (a damaged one is moved aside and skipped)."""
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("seg-*.npz")):
            if path.name in self._seen:
                continue
            got = self._read(path)
            self._seen.add(path.name)
            if got is not None:
                keys, values = got
                self._index.update(zip((bytes(k) for k in keys), values.tolist()))

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            with np.load(path, allow_pickle=False) as z:
                keys, values, digest = z["keys"], z["values"], str(z["digest"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            problem = f"unreadable ({type(exc).__name__})"
        else:
            well_formed = keys.ndim == 2 and keys.shape[1] == KEY_BYTES and values.shape == (keys.shape[0],)
            if well_formed and _digest(keys, values) == digest and bool(np.all(np.isfinite(values))):
                return keys, values
            problem = "fails its digest"
        log.warning("effort store: segment %s %s: moved aside, its samples are scored again", path.name, problem)
        self._quarantine(path)
        return None

    @staticmethod
    def _quarantine(path: Path) -> None:
        with contextlib.suppress(OSError):  # another process moved it first
            os.replace(path, path.with_name(path.name + ".corrupt"))

    def lookup(self, keys: Sequence[bytes]) -> np.ndarray:
        """The stored score of each key, NaN where there is none."""
        self.refresh()
        return np.array([self._index.get(k, np.nan) for k in keys], dtype=np.float64)

    def __len__(self) -> int:
        self.refresh()
        return len(self._index)

    # -- writing ----------------------------------------------------------------------------------
    def insert(self, keys: Sequence[bytes], values: Sequence[float]) -> Path | None:
        """Store scores (one new segment; nothing for an empty call). Non-finite scores are refused."""
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} scores")
        if not len(keys):
            return None
        arr = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError("effort scores must be finite")
        key_arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
        import io

        buf = io.BytesIO()
        np.savez(buf, keys=key_arr, values=arr, digest=np.array(_digest(key_arr, arr)), format=np.array(FORMAT))
        name = (f"seg-{time.time_ns():020d}-{socket.gethostname()[:32]}-{os.getpid()}-"
                f"{secrets.token_hex(4)}.npz")
        path = self.folder / name
        atomic_write_bytes(path, buf.getvalue())
        self._index.update(zip(keys, arr.tolist()))
        self._seen.add(name)
        return path


class BufferedInsert:
    """A `sink` for `EffortScorer.score`: collects each batch's scores and writes them to the store
    every `every` samples (and on `flush`), so an interrupted run keeps all but the last few."""

    def __init__(self, store: ScoreStore, keys: Sequence[bytes], every: int = 64) -> None:
        self.store, self.keys, self.every = store, keys, max(1, every)
        self._keys: list[bytes] = []
        self._values: list[float] = []

    def __call__(self, indices: np.ndarray, scores: np.ndarray) -> None:
        self._keys.extend(self.keys[int(i)] for i in indices)
        self._values.extend(float(v) for v in scores)
        if len(self._keys) >= self.every:
            self.flush()

    def flush(self) -> None:
        if self._keys:
            self.store.insert(self._keys, self._values)
            self._keys, self._values = [], []
