"""`dealrec cache`: what the cache holds, and removing the entries not used for a while."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

from core.cli.common import UsageError, cache_dir_of


def cmd_cache(args: argparse.Namespace) -> int:
    from core.cache_admin import cache_entries, human_bytes, remove_entry, stale_entries

    root = cache_dir_of(args)
    if args.older_than is not None and args.older_than < 0:
        raise UsageError(f"--older-than {args.older_than:g}: a number of days, at least 0")
    entries = cache_entries(root)
    unknown = set(args.kind) - {e.kind for e in entries}
    if unknown and args.older_than is not None:
        raise UsageError(f"--kind {', '.join(sorted(unknown))}: no such entries in {root}; it holds "
                         f"{', '.join(sorted({e.kind for e in entries})) or 'nothing'}")
    out = sys.stdout
    if args.older_than is None:
        by_kind: dict[str, list] = defaultdict(list)
        for e in entries:
            if not args.kind or e.kind in args.kind:
                by_kind[e.kind].append(e)
        if args.json:
            out.write(json.dumps({"cache": str(root), "kinds": {
                k: {"entries": len(v), "bytes": sum(e.bytes for e in v), "oldest_use": min(e.last_used for e in v),
                    "newest_use": max(e.last_used for e in v)} for k, v in sorted(by_kind.items())}}, indent=2) + "\n")
            return 0
        out.write(f"cache {root}: {len(entries)} entries, {human_bytes(sum(e.bytes for e in entries))}\n")
        if by_kind:
            out.write(f"  {'kind':<22}{'entries':>8}{'size':>11}  last used\n")
        now = time.time()
        for kind, group in sorted(by_kind.items(), key=lambda kv: -sum(e.bytes for e in kv[1])):
            ages = sorted(int((now - e.last_used) // 86400) for e in group)
            span = "today" if ages[-1] == 0 else (f"{ages[0]}" if ages[0] == ages[-1] else f"{ages[0]}-{ages[-1]}") + \
                " days ago"
            out.write(f"  {kind:<22}{len(group):>8}{human_bytes(sum(e.bytes for e in group)):>11}  {span}\n")
        return 0
    stale = stale_entries(entries, args.older_than, args.kind)
    total = sum(e.bytes for e in stale)
    verb = "would remove" if args.dry_run else "removed"
    for e in stale:
        if not args.dry_run:
            remove_entry(e)
        out.write(f"{verb} {e.path} ({e.kind}, {human_bytes(e.bytes)}, last used "
                  f"{int((time.time() - e.last_used) // 86400)} days ago)\n")
    out.write(f"{verb} {len(stale)} of {len(entries)} entries, {human_bytes(total)}\n")
    return 0
