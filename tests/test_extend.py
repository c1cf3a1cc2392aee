"""Dataset versions (core/data/extend.py, `dealrec extend`) and the warm-started surrogate of an
incremental prune (`dealrec prune --warm-start`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.config import SurrogateConfig
from core.data import load_dataset
from core.data.errors import DataError
from core.data.extend import extend_files
from core.data.synthetic import dealrec_layout_files, split_users
from core.surrogate.model import SASRec
from core.surrogate.train import warm_start

ROOT = Path(__file__).resolve().parents[1]


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _split_users(n_old: int, n_new: int, seed: int = 3) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The synthetic dataset of n_old + n_new users as (first n_old users, the rest as an addition)."""
    return split_users(dealrec_layout_files(n_old + n_new, 30, seed), n_old)


def test_extending_appends_users_and_drops_a_repeated_header(tmp_path):
    old_files, new_files = _split_users(30, 10)
    old = _write(tmp_path / "old", old_files)
    add = _write(tmp_path / "add", new_files)
    changed = extend_files(old, add, tmp_path / "v2")
    assert sorted(changed) == ["sequential_test.txt", "sequential_train.txt", "sequential_valid.txt", "users.tsv"]
    before, after = load_dataset(old), load_dataset(tmp_path / "v2")
    full = load_dataset(_write(tmp_path / "full", dealrec_layout_files(40, 30, 3)))
    assert (before.n_users, after.n_users) == (30, 40)
    assert after.fingerprint == full.fingerprint  # the same dataset as if it had come whole
    assert after.limit_users(30).fingerprint == before.fingerprint
    assert load_dataset(old).fingerprint == before.fingerprint  # the old version untouched


def test_extending_refuses_what_it_cannot_append(tmp_path):
    old = _write(tmp_path / "old", dealrec_layout_files(5, 10, 1))
    bad = _write(tmp_path / "bad", {"sequential_train.txt": b"6 1 2\n", "notes.bin": b"x"})
    (old / "notes.bin").write_bytes(b"y")
    with pytest.raises(DataError, match="can be appended"):
        extend_files(old, bad, tmp_path / "v2")
    with pytest.raises(DataError, match="no file"):
        extend_files(old, _write(tmp_path / "empty", {}), tmp_path / "v3")


def test_warm_start_copies_the_known_items_rows():
    cfg = SurrogateConfig(hidden_size=16, num_heads=2, num_layers=1)
    torch.manual_seed(0)
    small, big = SASRec(10, cfg), SASRec(14, cfg)
    fresh_rows = big.item_embeddings.weight[11:].detach().clone()
    warm_start(big, small.state_dict())
    assert torch.equal(big.item_embeddings.weight[:11], small.item_embeddings.weight)
    assert torch.equal(big.item_embeddings.weight[11:], fresh_rows)
    assert torch.equal(big.blocks[0].attention.dense.weight, small.blocks[0].attention.dense.weight)
    with pytest.raises(ValueError, match="earlier surrogate"):
        warm_start(SASRec(14, SurrogateConfig(hidden_size=32, num_heads=2, num_layers=1)), small.state_dict())


def _dealrec(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                          "DEALREC_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}, timeout=600)


def test_extend_then_prune_warm_started(tmp_path):
    old_files, new_files = _split_users(60, 10, seed=5)
    old = _write(tmp_path / "old", old_files)
    add = _write(tmp_path / "add", new_files)
    cache = tmp_path / "cache"
    r = _dealrec("extend", "--data", old, "--add", add, "--out", tmp_path / "v2", cache=cache)
    assert r.returncode == 0, r.stderr
    assert "users 60 -> 70 (training samples " in r.stdout
    common = ["--method", "influence", "--budget", "10", "--epochs", "10", "--no-progress"]
    r = _dealrec("prune", "--data", tmp_path / "v2", "--warm-start", old, *common, "--out", tmp_path / "o", cache=cache)
    assert r.returncode == 2 and "prune it first" in r.stderr and "Traceback" not in r.stderr
    assert _dealrec("prune", "--data", old, *common, "--out", tmp_path / "o1", cache=cache).returncode == 0
    r = _dealrec("prune", "--data", tmp_path / "v2", "--warm-start", old, *common, "--out", tmp_path / "o2",
                 cache=cache)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "o2" / "selection.json").read_text())
    assert doc["n_samples"] == 70 and len(doc["selected"]) == 10
    # The warm-started surrogate is cached under a key of its own: a cold run is not served it.
    assert len(list(cache.glob("surrogate-*"))) == 2
    cold = _dealrec("prune", "--data", tmp_path / "v2", *common, "--out", tmp_path / "o3", cache=cache)
    assert cold.returncode == 0 and len(list(cache.glob("surrogate-*"))) == 3
    r = _dealrec("extend", "--data", old, "--add", add, "--out", tmp_path / "v2", cache=cache)
    assert r.returncode == 2 and "exists" in r.stderr


def test_a_warm_started_surrogate_is_never_worse_on_validation_than_its_start(tmp_path):
    from core.surrogate.train import train_surrogate

    old_files, new_files = _split_users(60, 20, seed=7)
    old = load_dataset(_write(tmp_path / "old", old_files))
    extend_files(tmp_path / "old", _write(tmp_path / "add", new_files), tmp_path / "v2")
    new = load_dataset(tmp_path / "v2")
    cfg = SurrogateConfig(hidden_size=16, num_heads=2, num_layers=1, epochs=8, eval_every=1, patience=2)
    previous, _ = train_surrogate(old, cfg, seed=0)
    _, report = train_surrogate(new, cfg, seed=0, init_state=previous.state_dict())
    start = report["history"][0]
    assert start["epoch"] == 0 and start["loss"] is None
    assert report["valid"]["recall@20"] >= start["recall@20"]
    assert report["warm_start"] is True


def test_the_adam_state_is_saved_and_carried_into_a_warm_start(tmp_path):
    """The checkpoint keeps the Adam state of the best epoch; a warm start from it continues with that
    state (new items' rows with zero moments) and is cached under a key of its own, while a warm start
    from a checkpoint without it keeps the key it had before."""
    from core.config import PruneConfig
    from core.stages.scoring import surrogate_key
    from core.surrogate.train import (
        has_optimizer_state,
        load_warm_start,
        save_checkpoint,
        train_surrogate,
        train_surrogate_state,
    )

    old_files, new_files = _split_users(60, 20, seed=7)
    old = load_dataset(_write(tmp_path / "old", old_files))
    extend_files(tmp_path / "old", _write(tmp_path / "add", new_files), tmp_path / "v2")
    new = load_dataset(tmp_path / "v2")
    cfg = SurrogateConfig(hidden_size=16, num_heads=2, num_layers=1, epochs=6, eval_every=1, patience=2)
    previous, report, opt_state = train_surrogate_state(old, cfg, seed=0)
    steps = {int(v["step"]) for v in opt_state["state"].values()}
    assert steps and min(steps) > 0

    with_adam, without = tmp_path / "a" / "surrogate.pt", tmp_path / "b" / "surrogate.pt"
    save_checkpoint(previous, with_adam, {"r": 1}, optimizer=opt_state)
    save_checkpoint(previous, without, {"r": 1})
    assert has_optimizer_state(with_adam) and not has_optimizer_state(without)
    weights, loaded = load_warm_start(with_adam)
    assert loaded is not None and load_warm_start(without)[1] is None
    assert all(torch.equal(weights[k], v) for k, v in previous.state_dict().items())

    # A grown catalogue: the saved moments cover the known items' rows, the new rows start at zero.
    grown = SASRec(previous.n_items + 5, cfg)
    warm_start(grown, weights)
    from core.surrogate.train import _load_optimizer

    opt = torch.optim.Adam(grown.parameters(), lr=cfg.lr)
    _load_optimizer(opt, grown, loaded, lr=cfg.lr / 2)
    table = grown.item_embeddings.weight
    moments = opt.state[table]["exp_avg_sq"]
    assert moments.shape == table.shape and torch.all(moments[previous.n_items + 1:] == 0)
    assert opt.param_groups[0]["lr"] == cfg.lr / 2

    # Adam continues: its step count (bias correction) is the earlier run's, not a fresh 0.
    assert int(opt.state[table]["step"]) == max(steps)

    _, carried = train_surrogate(new, cfg, seed=0, init_state=weights, init_optimizer=loaded)
    _, fresh = train_surrogate(new, cfg, seed=0, init_state=weights)
    assert carried["optimizer_carried"] is True and fresh["optimizer_carried"] is False

    prune_cfg = PruneConfig()
    base = surrogate_key(new, prune_cfg)
    assert len({base, surrogate_key(new, prune_cfg, with_adam), surrogate_key(new, prune_cfg, without)}) == 3
