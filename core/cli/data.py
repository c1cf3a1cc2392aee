"""`dealrec inspect` (validate and describe a dataset) and `dealrec extend` (a new version of one)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from core.cli.common import UsageError


def cmd_inspect(args: argparse.Namespace) -> int:
    from core.data import load_dataset

    ds = load_dataset(args.data, fmt=args.format, split=args.split, limit_users=args.limit_users)
    stats = ds.statistics()
    if args.json:
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
    else:
        sys.stdout.write(f"dataset {args.data}: valid\n")
        notes = stats.pop("notes", [])
        for k, v in stats.items():
            sys.stdout.write(f"  {k:<22} {v}\n")
        for note in notes:
            sys.stdout.write(f"note: {note}\n")
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    from core.data import load_dataset
    from core.data.extend import extend_files

    out = Path(args.out)
    if out.exists():
        raise UsageError(f"--out '{out}' exists: a new version goes into a new folder")
    before = load_dataset(args.data, fmt=args.format, split=args.split)
    adds = [Path(a) for a in args.add]
    with tempfile.TemporaryDirectory(prefix="dealrec-extend-") as tmp:
        if len(adds) == 1 and adds[0].is_dir():
            addition = adds[0]
        else:
            addition = Path(tmp)
            for a in adds:
                if not a.is_file():
                    raise UsageError(f"--add '{a}' is not a file")
                (addition / a.name).write_bytes(a.read_bytes())
        try:
            changed = extend_files(Path(args.data), addition, out)
            after = load_dataset(out, fmt=args.format, split=args.split)
        except Exception:
            shutil.rmtree(out, ignore_errors=True)  # no half-made version is left behind
            raise
    # Samples beside users: a user whose only items are validation / test ones counts but has no sample.
    sys.stdout.write(f"wrote {out}: {', '.join(changed)} extended; users {before.n_users} -> {after.n_users} "
                     f"(training samples {before.n_samples} -> {after.n_samples}), "
                     f"items {before.n_items} -> {after.n_items}, fingerprint {after.fingerprint}\n")
    return 0
