"""A per-batch journal of the BIGRec evaluation's generation pass, so that an interrupted evaluation
resumes where it stopped instead of starting over.

Generating for all 1,330 test users of 10,000 Games users takes over an hour on one CPU core; a
session that ends, a worker that is restarted or a machine that is handed back would otherwise lose
all of it. Each finished batch is appended as one JSON line (flushed and fsynced) after a header
that fingerprints everything the results depend on (prompts, answers, generation settings, the
dataset and the model's weights, never a path or a file date, so a journal carried to another folder
or machine still resumes there). A later run with the same fingerprint skips those batches; a run
with another one leaves the file alone until it records its own first batch, then replaces it.
Batches are the same on resume (the batch order is
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


def weights_fingerprint(model, sample: int = 2048, frozen_only: bool = False) -> str:
    """A digest of a model's weights that does not read them all: every parameter's name, shape,
    dtype and its first and last `sample` values (a LoRA adapter's tensors included; with
    `frozen_only`, the parameters that do not train: the base model under an adapter being trained).
    Independent of where the files lie or when they were written."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if frozen_only and param.requires_grad:
                continue
            flat = param.detach().reshape(-1)
            ends = torch.cat([flat[:sample], flat[-sample:]]) if flat.numel() > 2 * sample else flat
            h.update(f"{name}|{tuple(param.shape)}|{param.dtype}".encode())
            h.update(ends.float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


class GenerationJournal:
    """Append-only record of finished batches under `path`, valid for one `key` (a fingerprint)."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = Path(path), key
        self.rows: dict[int, JournalRow] = {}
        self.seconds = 0.0  # generation time already spent by earlier runs
        self._ours = False  # the file holds this evaluation's header (else it is replaced at the first record)
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        first = data.split(b"\n", 1)[0]
        try:
            header = json.loads(first) if first else {}
        except json.JSONDecodeError:
            header = {}
        if not isinstance(header, dict) or header.get("journal") != JOURNAL_FORMAT or header.get("key") != self.key:
            log.warning("%s belongs to another evaluation (or is unreadable): it is replaced once this one "
                        "records its first batch", self.path)
            return
        self._ours = True
        if not data.endswith(b"\n"):
            # A crash mid-append: drop the torn tail so that the next batch starts on a line of its own.
            data = data[:data.rfind(b"\n") + 1]
            with self.path.open("r+b") as f:
                f.truncate(len(data))
        for line in data.decode("utf-8", errors="replace").splitlines()[1:]:
            try:
                batch = json.loads(line)
                rows = {int(r["i"]): JournalRow(str(r["text"]), None if r["nll"] is None else float(r["nll"]),
                                                int(r["answer_tokens"]), int(r["new_tokens"])) for r in batch["rows"]}
                seconds = float(batch["seconds"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                continue  # a line cut short by a crash: that batch runs again
            if rows.keys() <= self.rows.keys():
                continue  # the same batch twice (two runs at once): counted once
            self.rows.update(rows)
            self.seconds += seconds
        if self.rows:
            log.info("%s: resuming after %d finished prompts (%.0f s of earlier generation)", self.path,
                     len(self.rows), self.seconds)

    def record(self, rows: dict[int, JournalRow], seconds: float) -> None:
        """Append one finished batch (prompt index -> row) and the seconds it took."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (self._ours and self.path.is_file())
        with self.path.open("w" if fresh else "a", encoding="utf-8") as f:
            if fresh:
                f.write(json.dumps({"journal": JOURNAL_FORMAT, "key": self.key}) + "\n")
                self._ours = True
            f.write(json.dumps({"rows": [{"i": i, "text": r.text, "nll": r.nll, "answer_tokens": r.answer_tokens,
                                          "new_tokens": r.new_tokens} for i, r in rows.items()],
                                "seconds": round(seconds, 3)}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.update(rows)

    def discard(self) -> None:
        """The evaluation finished (its result is kept elsewhere): the journal is no longer needed."""
        self.path.unlink(missing_ok=True)
