"""`dealrec prune` on data where some users have no training sample (an empty DEALRec training line; an
interaction log whose chrono split leaves a user only validation / test items): the selection draws
from the users with a sample only, every per-sample output has one row per sample, and the
evaluation counts the users without a sample whose history allows it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.cli import main
from core.config import SurrogateConfig
from core.data import load_dataset
from core.data.synthetic import dealrec_layout_files
from core.evaluate.bigrec import select_test_users
from core.surrogate.train import evaluate, train_surrogate
from tests.tiny_llm import tiny_model_folder

EMPTY_TRAIN = (3, 12, 30)  # 1-based user ids whose training line is emptied; user 30 also loses its valid item


def dealrec_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, content in dealrec_layout_files(n_users=40, n_items=25, seed=2).items():
        lines = content.decode().splitlines()
        if name in ("sequential_train.txt", "sequential_valid.txt"):
            emptied = EMPTY_TRAIN if name == "sequential_train.txt" else (30,)
            lines = [line.split()[0] if int(line.split()[0]) in emptied else line for line in lines]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def csv_log_folder(folder: Path) -> Path:
    """36 users with five interactions, and four users whose interactions all come after 80 % of the
    log: two in validation, two in test under the chrono split (196 rows: 156 train, 20 valid, 20 test)."""
    folder.mkdir(parents=True)
    rows = [(f"u{u}", f"i{(u * 7 + j) % 25}", j * 100 + u) for u in range(36) for j in range(5)]
    rows += [(f"late{u}", f"i{(u + j) % 25}", 420.5 + 0.1 * (2 * u + j) if j < 2 else 1000 + 10 * j + u)
             for u in range(4) for j in range(4)]
    rows.sort(key=lambda r: (r[0].startswith("late"), r[2] % 7, r[2]))  # log order is not time order
    log = "".join(f"{u},{i},{t}\n" for u, i, t in rows)
    (folder / "interactions.csv").write_text("user_id,item_id,timestamp\n" + log)
    (folder / "items.csv").write_text("item_id,title\n" + "".join(f"i{i},Game number {i}\n" for i in range(25)))
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("no-sample")
    return root, tiny_model_folder(root / "tiny-llm")


@pytest.fixture(scope="module", params=["dealrec", "csv"])
def data(request, workspace) -> Path:
    root, _ = workspace
    return dealrec_folder(root / "dealrec") if request.param == "dealrec" else csv_log_folder(root / "csv")


def test_users_without_a_sample_are_counted_and_evaluated(data, capsys):
    ds = load_dataset(data)
    without = ds.n_users - ds.n_samples
    assert without == (3 if data.name == "dealrec" else 4)
    assert ds.statistics()["users_without_training_sample"] == without
    assert main(["inspect", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert f"users_without_training_sample {without}" in " ".join(out.split())
    assert f"note: {without} of {ds.n_users} users have no training sample" in out
    assert all(ds.train[u] for u in range(ds.n_samples)) and not any(ds.train[ds.n_samples:])
    evaluable = ds.evaluable_without_sample()
    assert 0 < evaluable <= without
    # The surrogate never trains on them but tests on those whose validation items make a history.
    model, report = train_surrogate(ds, SurrogateConfig(hidden_size=16, num_heads=2, num_layers=1, epochs=1),
                                    seed=0)
    assert report["train_users"] <= ds.n_samples
    assert evaluate(model, ds, "test", users=range(ds.n_samples, ds.n_users))["users"] == evaluable
    assert evaluate(model, ds, "valid", users=range(ds.n_samples, ds.n_users))["users"] == 0
    # BIGRec's test users: a test item after a non-empty history
    extra = [u for u in select_test_users(ds) if u >= ds.n_samples]
    assert len(extra) == evaluable


@pytest.mark.parametrize("method", ["random", "influence", "dealrec"])
def test_prune_selects_only_users_with_a_sample(data, workspace, method, capsys):
    root, llm = workspace
    ds = load_dataset(data)
    out = root / f"out-{data.name}-{method}"
    code = main(["prune", "--data", str(data), "--method", method, "--budget", "30", "--epochs", "2",
                 "--llm", str(llm), "--threads", "1", "--cache-dir", str(root / "cache"), "--no-progress",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "selection.json").read_text())
    assert doc["n_samples"] == ds.n_samples and len(doc["selected"]) == 30
    indices = [s["index"] for s in doc["selected"]]
    assert len(set(indices)) == 30 and max(indices) < ds.n_samples
    sampled = set(ds.user_ids[:ds.n_samples])
    assert {s["user_id"] for s in doc["selected"]} <= sampled
    assert (out / "selection.csv").read_text().splitlines()[1:] == [s["user_id"] for s in doc["selected"]]
    rows = (out / "scores.csv").read_text().splitlines()
    assert len(rows) == ds.n_samples + 1
    assert len((out / "bigrec_train.jsonl").read_text().splitlines()) == 30
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert diagnostics["n_samples"] == ds.n_samples
    if method != "random":  # scores.csv: index, user_id, influence, effort, ...; every sample scored
        columns = [2, 3] if method == "dealrec" else [2]
        scores = np.array([[float(r.split(",")[c]) for c in columns] for r in rows[1:]])
        assert np.isfinite(scores).all()
    # limit_users counts users with a sample
    limited = root / f"limited-{data.name}-{method}"
    code = main(["prune", "--data", str(data), "--method", method, "--budget", "5", "--limit-users", "10",
                 "--epochs", "2", "--llm", str(llm), "--threads", "1", "--cache-dir", str(root / "cache"),
                 "--no-progress", "--out", str(limited)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((limited / "selection.json").read_text())
    assert doc["n_samples"] == 10 and max(s["index"] for s in doc["selected"]) < 10
