"""The per-sample effort store: lookups and inserts, several writers, damaged segments detected and
never read, and an effort stage that scores only the samples it has not seen, with the very scores a
cold run computes (a sample's score does not depend on its pool)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_llm import tiny_dataset, tiny_model_folder

from core.config import EffortConfig
from core.effort.prompts import PromptTemplate
from core.effort.store import BufferedInsert, ScoreStore, file_digest, sample_key
from core.stages.effort import effort_stage


def _keys(n: int, offset: int = 0) -> list[bytes]:
    return [sample_key([1, 2, 3, i + offset]) for i in range(n)]


def test_insert_then_lookup_across_instances(tmp_path):
    store = ScoreStore(tmp_path, "cfg")
    keys = _keys(5)
    assert np.isnan(store.lookup(keys)).all()
    store.insert(keys[:3], [0.5, 1.5, 2.5])
    other = ScoreStore(tmp_path, "cfg")  # another process or machine reading the same root
    got = other.lookup(keys)
    np.testing.assert_array_equal(got[:3], [0.5, 1.5, 2.5])
    assert np.isnan(got[3:]).all()
    assert np.isnan(ScoreStore(tmp_path, "another-config").lookup(keys)).all()
    with pytest.raises(ValueError, match="finite"):
        store.insert(keys[3:4], [float("nan")])
    with pytest.raises(ValueError):
        store.insert(keys[3:5], [1.0])


def test_sample_key_is_the_prompt():
    assert sample_key([5, 6, 7]) == sample_key((5, 6, 7))
    assert sample_key([5, 6, 7]) != sample_key([5, 6, 8]) != sample_key([5, 6])
    assert len(sample_key([1])) == 16


def _writer(root: str, offset: int) -> None:
    store = ScoreStore(Path(root), "cfg")
    for start in range(0, 50, 10):
        store.insert(_keys(10, offset + start), [float(offset + start + i) for i in range(10)])


def test_several_processes_insert_at_once(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), off)) for off in (0, 1000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = ScoreStore(tmp_path, "cfg")
    np.testing.assert_array_equal(store.lookup(_keys(50, 0)), np.arange(50.0))
    np.testing.assert_array_equal(store.lookup(_keys(50, 1000)), np.arange(1000.0, 1050.0))
    assert len(list(store.folder.glob("seg-*.npz"))) == 10


def test_a_damaged_segment_is_detected_moved_aside_and_never_read(tmp_path, caplog):
    store = ScoreStore(tmp_path, "cfg")
    good = store.insert(_keys(4), [1.0, 2.0, 3.0, 4.0])
    bad = store.insert(_keys(4, 100), [5.0, 6.0, 7.0, 8.0])
    raw = bytearray(bad.read_bytes())
    at = raw.find(np.array([6.0]).tobytes())
    raw[at + 3] ^= 0x01  # a flipped bit inside a stored score: still a number, a wrong one
    assert at > 0
    bad.write_bytes(bytes(raw))
    truncated = store.insert(_keys(2, 200), [9.0, 10.0])
    truncated.write_bytes(truncated.read_bytes()[:50])  # a copy cut short
    # A temporary file left by a writer that died before its rename is never a segment.
    (store.folder / ".seg-0-x.npz.tmp").write_bytes(b"half")

    fresh = ScoreStore(tmp_path, "cfg")
    with caplog.at_level("WARNING", logger="core.effort.store"):
        got = fresh.lookup(_keys(4) + _keys(4, 100) + _keys(2, 200))
    np.testing.assert_array_equal(got[:4], [1.0, 2.0, 3.0, 4.0])
    assert np.isnan(got[4:]).all()
    assert not bad.exists() and bad.with_name(bad.name + ".corrupt").exists()
    assert not truncated.exists() and good.exists()
    assert sum("moved aside" in r.message for r in caplog.records) == 2


def test_buffered_insert_writes_every_n_and_on_flush(tmp_path):
    store = ScoreStore(tmp_path, "cfg")
    keys = _keys(10)
    sink = BufferedInsert(store, keys, every=4)
    sink(np.array([0, 1, 2]), np.array([0.0, 1.0, 2.0]))
    assert not list(store.folder.glob("seg-*.npz")) if store.folder.exists() else True
    sink(np.array([3, 4]), np.array([3.0, 4.0]))
    assert len(list(store.folder.glob("seg-*.npz"))) == 1
    sink(np.array([9]), np.array([9.0]))
    sink.flush()
    np.testing.assert_array_equal(ScoreStore(tmp_path, "cfg").lookup([keys[i] for i in (0, 4, 9)]), [0.0, 4.0, 9.0])


def test_file_digest_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
    assert file_digest(a) == file_digest(b) and file_digest(None) is None
    (b / "adapter_model.safetensors").write_bytes(b"other weights")
    assert file_digest(a) != file_digest(b)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-llm"))


@pytest.mark.parametrize("loss", ["prompt", "response"])
def test_effort_stage_scores_only_new_samples_and_equals_a_cold_run(tiny_llm, tmp_path, loss):
    ds = tiny_dataset(40, seed=4)
    cfg = EffortConfig(llm=str(tiny_llm), seed=2, loss=loss, processes=1)
    dev = torch.device("cpu")
    template = PromptTemplate()
    warm = tmp_path / "warm"
    _, info, _, _ = effort_stage(ds.limit_users(30), cfg, dev, warm, template)
    assert (info["scored"], info["from_store"]) == (30, 0)
    grown, info, _, tokens = effort_stage(ds, cfg, dev, warm, template)
    assert (info["scored"], info["from_store"]) == (10, 30)
    cold, info, _, _ = effort_stage(ds, cfg, dev, tmp_path / "cold", template)
    assert (info["scored"], info["from_store"]) == (40, 0)
    # Bit for bit: each sample is scored alone with the template's prefix, whatever its pool.
    np.testing.assert_array_equal(grown, cold)
    assert len(tokens) == 40
    again, info, _, _ = effort_stage(ds, cfg, dev, warm, template)
    assert info.get("cached") and np.array_equal(again, cold)


def test_the_model_key_is_its_content_not_its_path_or_date(tmp_path):
    """Cache and store keys name the model by content: a copy at another path with other file dates
    (a reinstall, another checkout or machine) keeps the key; other weights change it; a README does not."""
    import os
    import shutil

    from tiny_llm import tiny_model_folder

    from core.effort import llm as llm_mod
    from core.effort.llm import resolve_llm

    here = tiny_model_folder(tmp_path / "a")
    there = tmp_path / "elsewhere" / "b"
    shutil.copytree(here, there)
    for p in there.iterdir():
        os.utime(p, ns=(1, 1))
    (there / "README.md").write_text("notes")
    key = resolve_llm(str(here)).key()
    assert resolve_llm(str(there)).key() == key
    weights = next(p for p in there.iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert resolve_llm(str(there)).key() != key
    # A file too big to hash whole is sampled in windows spread over it, its size included.
    big = tmp_path / "big.gguf"
    big.write_bytes(bytes(3000))
    small_whole, llm_mod.WHOLE_FILE_BYTES = llm_mod.WHOLE_FILE_BYTES, 1000
    try:
        first = resolve_llm(str(big)).key()
        big.write_bytes(bytes(2999) + b"\1")  # the last window sees it
        assert resolve_llm(str(big)).key() != first
    finally:
        llm_mod.WHOLE_FILE_BYTES = small_whole
