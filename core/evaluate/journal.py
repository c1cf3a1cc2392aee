"""A per-batch journal of the BIGRec evaluation's generation pass, so that an interrupted evaluation
resumes where it stopped instead of starting over.

Generating for all 1,330 test users of 10,000 Games users takes over an hour on one CPU core; a
session that ends, a worker that is restarted or a machine that is handed back would otherwise lose
all of it. Each finished batch is appended as one JSON line (flushed and fsynced) after a header
that fingerprints everything the results depend on (prompts, answers, generation settings, the
dataset and the adapter's weights). A later run with the same fingerprint skips those batches; with
a different one the journal is started afresh. Batches are the same on resume (the batch order is
fixed by the prompts and the batch size), so a resumed evaluation gives exactly the results of an
uninterrupted one. A line cut short by a crash is ignored (that batch runs again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_FORMAT = 1


@dataclass(frozen=True)
class JournalRow:
    """One prompt's finished result, as `generate_batched` produces it."""

    text: str
    nll: float | None
    answer_tokens: int
    new_tokens: int


def fingerprint(*parts: Any) -> str:
    """A digest of JSON-serialisable parts (lists of token ids, config dumps, file digests)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, separators=(",", ":")).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def file_digest(path: Path) -> str | None:
    """sha256 of a file's bytes (None when there is no such file)."""
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class GenerationJournal:
    """Append-only record of finished batches under `path`, valid for one `key` (a fingerprint)."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = Path(path), key
        self.rows: dict[int, JournalRow] = {}
        self.seconds = 0.0  # generation time already spent by earlier runs
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # A crash mid-append: drop the torn tail so that the next batch starts on a line of its own.
            data = data[:data.rfind(b"\n") + 1]
            with self.path.open("r+b") as f:
                f.truncate(len(data))
        lines = data.decode("utf-8", errors="replace").splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if header.get("journal") != JOURNAL_FORMAT or header.get("key") != self.key:
            log.warning("%s belongs to another evaluation (or is unreadable): starting afresh", self.path)
            self.path.unlink()
            return
        for line in lines[1:]:
            try:
                batch = json.loads(line)
                rows = {int(r["i"]): JournalRow(str(r["text"]), None if r["nll"] is None else float(r["nll"]),
                                                int(r["answer_tokens"]), int(r["new_tokens"])) for r in batch["rows"]}
                seconds = float(batch["seconds"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line cut short by a crash: that batch runs again
            self.rows.update(rows)
            self.seconds += seconds
        if self.rows:
            log.info("%s: resuming after %d finished prompts (%.0f s of earlier generation)", self.path,
                     len(self.rows), self.seconds)

    def record(self, rows: dict[int, JournalRow], seconds: float) -> None:
        """Append one finished batch (prompt index -> row) and the seconds it took."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.is_file()
        with self.path.open("a", encoding="utf-8") as f:
            if new_file:
                f.write(json.dumps({"journal": JOURNAL_FORMAT, "key": self.key}) + "\n")
            f.write(json.dumps({"rows": [{"i": i, "text": r.text, "nll": r.nll, "answer_tokens": r.answer_tokens,
                                          "new_tokens": r.new_tokens} for i, r in rows.items()],
                                "seconds": round(seconds, 3)}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.update(rows)

    def discard(self) -> None:
        """The evaluation finished (its result is kept elsewhere): the journal is no longer needed."""
        self.path.unlink(missing_ok=True)
