"""The files a pruning run writes: selection.json / .csv, scores.csv, bigrec_train.jsonl and
diagnostics.json.

Every file is written to a temporary name and renamed, so a reader never sees half a file."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.cache import atomic_write_bytes
from core.effort.prompts import SampleRecord

SCORE_COLUMNS = ("index", "user_id", "influence", "effort", "overall", "stratum", "selected")
# After the original columns, so that readers of the first seven are unaffected: the raw effort norm
# (where a length correction made `effort` something else) and the prompt's length in tokens.
EXTRA_COLUMNS = ("effort_raw", "prompt_tokens")


def selection_document(result, limit_users: int | None = None) -> dict:
    """The `selection.json` schema (shared by the CLI and the service)."""
    ds, cfg, sel = result.dataset, result.config, result.selection
    return {
        "method": cfg.selection.method,
        "budget": cfg.selection.budget,
        "seed": cfg.seed,
        "dataset_fingerprint": ds.fingerprint,
        "n_samples": ds.n_samples,
        "params": {**cfg.model_dump(mode="json", by_alias=True), "limit_users": limit_users},
        "notes": list(sel.notes),
        "selected": [{"index": int(i), "user_id": ds.user_ids[int(i)]} for i in sel.selected],
    }


def _fmt(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else repr(float(x))


def scores_csv(result) -> bytes:
    ds, sel, scores = result.dataset, result.selection, result.scores
    chosen = np.zeros(ds.n_samples, dtype=bool)
    chosen[np.asarray(sel.selected, dtype=np.int64)] = True
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SCORE_COLUMNS + EXTRA_COLUMNS)
    infl, eff = scores.get("influence"), scores.get("effort")
    raw, tokens = scores.get("effort_raw", eff), scores.get("prompt_tokens")
    for u in range(ds.n_samples):
        w.writerow([u, ds.user_ids[u], _fmt(infl[u]) if infl is not None else "",
                    _fmt(eff[u]) if eff is not None else "", _fmt(sel.overall[u]),
                    int(sel.stratum[u]), int(chosen[u]), _fmt(raw[u]) if raw is not None else "",
                    int(tokens[u]) if tokens is not None else ""])
    return buf.getvalue().encode()


def selection_csv(result) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["user_id"])
    for i in result.selection.selected:
        w.writerow([result.dataset.user_ids[int(i)]])
    return buf.getvalue().encode()


def bigrec_jsonl(records: Sequence[SampleRecord]) -> bytes:
    return "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records).encode()


def write_outputs(result, out_dir: Path, records: Sequence[SampleRecord], limit_users: int | None = None) -> dict:
    """Write the four files (and diagnostics.json when the result has diagnostics); returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "selection.json": json.dumps(selection_document(result, limit_users), indent=2).encode() + b"\n",
        "selection.csv": selection_csv(result),
        "scores.csv": scores_csv(result),
        "bigrec_train.jsonl": bigrec_jsonl(records),
    }
    if getattr(result, "diagnostics", None) is not None:
        files["diagnostics.json"] = json.dumps(result.diagnostics, indent=1).encode() + b"\n"
    for name, data in files.items():
        atomic_write_bytes(out_dir / name, data)
    return {name: out_dir / name for name in files}
