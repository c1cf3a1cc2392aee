"""The `dealrec` command end to end, as a user runs it: real data, real LLM, real files."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dealrec(*args: str, cache: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DEALREC_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "core.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def write_dealrec_folder(folder: Path, train: str, valid: str, test: str, n_items: int) -> Path:
    folder.mkdir()
    (folder / "sequential_train.txt").write_text(train)
    (folder / "sequential_valid.txt").write_text(valid)
    (folder / "sequential_test.txt").write_text(test)
    items = "".join(f"{i}\ts{i}\tTitle {i}\n" for i in range(1, n_items + 1))
    (folder / "items.tsv").write_text("item_id\tsource_item_id\ttitle\n" + items)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    # Shared by the tests of this module: the de-quantised LLM is cached once.
    return Path(os.environ.get("DEALREC_TEST_CACHE", tmp_path_factory.mktemp("cache")))


@pytest.mark.games
def test_inspect_games(games_dir, cache):
    r = dealrec("inspect", "--data", str(games_dir), "--json", cache=cache)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["users"] == 49156 and stats["items"] == 17332


@pytest.mark.games
def test_prune_dealrec_real_llm_is_reproducible(games_dir, cache, tmp_path):
    """DEALRec with the real SmolLM2 effort score on a small slice: the four files, exactly the
    budget, unique users, and the same selection on a second run (which reuses the cached scores)."""
    args = ["prune", "--data", str(games_dir), "--limit-users", "48", "--budget", "12", "--strata", "5",
            "--epochs", "5", "--seed", "7", "--no-progress"]
    first = dealrec(*args, "--out", str(tmp_path / "a"), cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    second = dealrec(*args, "--out", str(tmp_path / "b"), cache=cache)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reused from cache" in second.stdout

    doc = json.loads((tmp_path / "a" / "selection.json").read_text())
    doc2 = json.loads((tmp_path / "b" / "selection.json").read_text())
    assert doc["selected"] == doc2["selected"]
    ids = [s["user_id"] for s in doc["selected"]]
    assert len(ids) == 12 == len(set(ids))
    assert doc["method"] == "dealrec" and doc["budget"] == 12 and doc["seed"] == 7
    assert doc["params"]["selection"]["lambda"] == 0.3 and doc["params"]["limit_users"] == 48

    rows = list(csv.DictReader((tmp_path / "a" / "scores.csv").open()))
    assert len(rows) == 48
    assert all(r["influence"] and r["effort"] for r in rows)
    assert sum(int(r["selected"]) for r in rows) == 12
    assert all(float(r["effort"]) > 0 for r in rows)
    sel_csv = (tmp_path / "a" / "selection.csv").read_text().splitlines()
    assert sel_csv[0] == "user_id" and sel_csv[1:] == ids
    records = [json.loads(x) for x in (tmp_path / "a" / "bigrec_train.jsonl").read_text().splitlines()]
    assert len(records) == 12 and set(records[0]) == {"instruction", "input", "output"}

    # Another method on the same data reuses the cached surrogate and scores.
    third = dealrec(*args[:-1], "--method", "influence", "--out", str(tmp_path / "c"), cache=cache)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "reused from cache" in third.stdout


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0"], "--budget"),
    (["--budget", "abc"], "--budget"),
    (["--budget", "inf"], "--budget"),
    (["--budget", "1e308"], "--budget"),
    (["--strata", "0"], "strata"),
    (["--lambda", "-1"], "lambda"),
    (["--llm", "/no/such/model"], "/no/such/model"),
    (["--surrogate", "hidden_sizes=3"], "no field 'hidden_sizes'; the fields are hidden_size,"),
    (["--surrogate", "hidden_size"], "expected FIELD=VALUE"),
    (["--surrogate", "hidden_size=7"], "--surrogate hidden_size: "),
    (["--influence", "lissa_steps=abc"], "--influence lissa_steps: "),
    (["--epochs", "3", "--surrogate", "epochs=4"], "epochs is set twice (also by --epochs)"),
    (["--surrogate", "epochs=0"], "--surrogate epochs: "),  # the flag the user typed, not --epochs
    (["--surrogate", "epochs=true"], "epochs takes a number, not true"),
    (["--method", "influence", "--influence", "parameter=0"],
     "--influence parameter: '0' is not a Linear layer of the surrogate"),
])
def test_prune_bad_parameters_exit_2(tmp_path, cache, extra, message):
    data = write_dealrec_folder(tmp_path / "data", "1 1 2 3\n2 2 3\n", "1\n2\n", "1 4\n2\n", n_items=4)
    method = [] if "--llm" in extra or "--method" in extra else ["--method", "random"]
    r = dealrec("prune", "--data", str(data), *method, *extra, "--out", str(tmp_path / "o"), "--no-progress",
                cache=cache)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "selection.json").exists()


def test_prune_surrogate_and_influence_settings(tmp_path, cache):
    """--surrogate/--influence FIELD=VALUE reach the run (as REST's params.surrogate/influence do) and
    are recorded with the selection; the shortcut flags join them."""
    data = write_dealrec_folder(tmp_path / "data", "1 1 2 3\n2 2 3\n3 1 3 4\n", "1\n2\n3\n", "1 4\n2\n3\n",
                                n_items=4)
    r = dealrec("prune", "--data", str(data), "--method", "influence", "--budget", "2", "--threads", "1",
                "--surrogate", "hidden_size=16", "--surrogate", "lr=5e-4", "--epochs", "3",
                "--influence", "lissa_steps=20", "--influence", "damping=0.05", "--solver", "lissa",
                "--out", str(tmp_path / "o"), "--no-progress", cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    params = json.loads((tmp_path / "o" / "selection.json").read_text())["params"]
    surrogate, influence = params["surrogate"], params["influence"]
    assert (surrogate["hidden_size"], surrogate["lr"], surrogate["epochs"]) == (16, 5e-4, 3)
    assert (influence["lissa_steps"], influence["damping"]) == (20, 0.05)


def test_inspect_bad_dataset_exit_2(tmp_path, cache):
    data = write_dealrec_folder(tmp_path / "data", "1 1 2\n2 2 x\n", "1\n2\n", "1\n2\n", n_items=2)
    r = dealrec("inspect", "--data", str(data), cache=cache)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sequential_train.txt" in r.stderr and "line 2" in r.stderr
