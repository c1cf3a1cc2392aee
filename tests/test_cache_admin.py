"""`dealrec cache`: the cache's entries by kind, and removing those not used for a while (by access or
modification time, whichever is newer), never anything that is not an entry."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from core.cache_admin import DAY_S, cache_entries, remove_entry, stale_entries
from core.cli import main


def _entry(root: Path, rel: str, files: dict[str, int], age_days: float) -> Path:
    folder = root / rel
    folder.mkdir(parents=True)
    when = time.time() - age_days * DAY_S
    for name, size in files.items():
        (folder / name).write_bytes(b"x" * size)
        os.utime(folder / name, (when, when))
    os.utime(folder, (when, when))
    return folder


@pytest.fixture
def cache(tmp_path) -> Path:
    root = tmp_path / "cache"
    _entry(root, "surrogate-" + "a" * 20, {"surrogate.pt": 1000}, age_days=40)
    _entry(root, "surrogate-" + "b" * 20, {"surrogate.pt": 500}, age_days=2)
    _entry(root, "items-bigrec-" + "c" * 20, {"items.npz": 300}, age_days=40)
    _entry(root, "llm/d1e10c81eace0713", {"config.json": 10, "model.safetensors": 5000}, age_days=40)
    _entry(root, "effort-store/effort-store-" + "d" * 20, {"seg-1.npz": 70, "seg-2.npz": 30}, age_days=40)
    # Not entries: a person's notes, a model someone keeps under llm/, a hidden temporary file.
    _entry(root, "notes", {"todo.txt": 5}, age_days=400)
    _entry(root, "llm/my-finetuned-model", {"config.json": 5}, age_days=400)
    _entry(root, "effort-store/backup", {"seg-0.npz": 5}, age_days=400)
    (root / ".effort.npz.tmp").write_bytes(b"x")
    os.utime(root / ".effort.npz.tmp", (0, 0))
    return root


def test_entries_by_kind_with_sizes(cache):
    entries = {e.path.relative_to(cache).as_posix(): e for e in cache_entries(cache)}
    assert sorted(entries) == ["effort-store/effort-store-" + "d" * 20, "items-bigrec-" + "c" * 20,
                               "llm/d1e10c81eace0713", "surrogate-" + "a" * 20, "surrogate-" + "b" * 20]
    kinds = {k: e.kind for k, e in entries.items()}
    assert kinds["items-bigrec-" + "c" * 20] == "items-bigrec" and kinds["llm/d1e10c81eace0713"] == "llm"
    assert entries["llm/d1e10c81eace0713"].bytes == 5010
    assert entries["effort-store/effort-store-" + "d" * 20].bytes == 100
    assert cache_entries(cache / "absent") == []


def test_stale_is_the_newer_of_access_and_modification(cache):
    old = cache / ("surrogate-" + "a" * 20)
    stale = {e.path.name for e in stale_entries(cache_entries(cache), 30)}
    assert stale == {old.name, "items-bigrec-" + "c" * 20, "d1e10c81eace0713", "effort-store-" + "d" * 20}
    # Read yesterday (its access time), written long ago: in use.
    yesterday, long_ago = time.time() - DAY_S, time.time() - 40 * DAY_S
    os.utime(old / "surrogate.pt", (yesterday, long_ago))
    stale = {e.path.name for e in stale_entries(cache_entries(cache), 30, kinds=["surrogate", "llm"])}
    assert stale == {"d1e10c81eace0713"}


def test_remove_entry_takes_the_whole_folder(cache):
    (entry,) = [e for e in cache_entries(cache) if e.kind == "llm"]
    remove_entry(entry)
    remove_entry(entry)  # gone already: nothing to do
    assert not entry.path.exists()
    assert [p.name for p in (cache / "llm").iterdir()] == ["my-finetuned-model"]


def test_cli_lists_then_removes_only_old_entries_of_the_kinds_asked(cache, capsys):
    assert main(["cache", "--cache-dir", str(cache), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)["kinds"]
    assert listing["surrogate"]["entries"] == 2 and listing["surrogate"]["bytes"] == 1500 and "notes" not in listing

    assert main(["cache", "--cache-dir", str(cache), "--older-than", "30", "--kind", "surrogate", "--dry-run"]) == 0
    assert "would remove 1 of 5 entries" in capsys.readouterr().out
    assert (cache / ("surrogate-" + "a" * 20)).is_dir()

    assert main(["cache", "--cache-dir", str(cache), "--older-than", "30"]) == 0
    out = capsys.readouterr().out
    assert "removed 4 of 5 entries" in out
    left = sorted(p.name for p in cache.iterdir())
    assert left == [".effort.npz.tmp", "effort-store", "llm", "notes", "surrogate-" + "b" * 20]
    assert (cache / "llm" / "my-finetuned-model").is_dir() and (cache / "effort-store" / "backup").is_dir()

    assert main(["cache", "--cache-dir", str(cache)]) == 0
    assert "1 entries" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--older-than", "-1"], "--older-than -1"),
    (["--older-than", "5", "--kind", "surogate"], "--kind surogate: no such entries"),
])
def test_cli_bad_arguments_exit_2(cache, capsys, argv, message):
    assert main(["cache", "--cache-dir", str(cache), *argv]) == 2
    assert message in capsys.readouterr().err
    assert len(cache_entries(cache)) == 5
