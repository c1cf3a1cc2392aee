"""bench/quality.py end to end on a tiny synthetic dataset (surrogate level without an LLM; the LLM
level with a tiny random Llama), and core.evaluate.surrogate."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from core.config import PruneConfig, SurrogateConfig
from core.data import load_dataset
from core.data.synthetic import dealrec_layout_files
from core.evaluate.surrogate import surrogate_level

ROOT = Path(__file__).resolve().parents[1]
NO_LLM = ["random", "grand", "el2n", "ccs", "influence"]  # the default methods that need no LLM
METRICS = {f"{m}@{k}" for m in ("recall", "ndcg") for k in (10, 20, 50)}


def _quality_module():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's string annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    for name, content in dealrec_layout_files(n_users=60, n_items=30, seed=1).items():
        (folder / name).write_bytes(content)
    return folder


def test_quality_bench_writes_reports_and_resumes(data_dir, tmp_path, capsys):
    quality = _quality_module()
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--data", str(data_dir), "--no-llm", "--seeds", "2", "--budgets", "10", "--ratio-budgets", "8,16,100",
            "--ratio-methods", "random,el2n,dealrec", "--epochs", "2", "--threads", "1", "--out", str(out),
            "--cache-dir", str(cache), "--no-progress", "--json"]

    assert quality.main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("results.md", "results.png", "results.json", "ratio.md", "ratio.png"):
        assert (out / name).stat().st_size > 0, name
    assert list(first) == ["full", *NO_LLM]
    for row in first.values():
        assert set(row) == METRICS
        assert all(set(v) == {"mean", "std"} and v["std"] >= 0 for v in row.values())

    report = json.loads((out / "results.json").read_text())
    assert report["methods"] == NO_LLM and report["seeds"] == [0, 1] and report["budgets"] == [10]
    # 5 methods + full per seed, plus the ratio points not already in the table (budget 100 > 60 users is skipped).
    assert len(report["cells"]) == 2 * 6 + 2 * 2 * 2
    assert report["ratio"]["budgets"] == [8, 16] and report["ratio"]["methods"] == ["random", "el2n"]
    assert not any(c["from_cell_cache"] for c in report["cells"])
    picked = [c for c in report["cells"] if c["method"] != "full"]
    assert all(c["selected"] == c["budget"] for c in picked)
    kept = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert all(len(c["selected"]) == c["budget"] for c in kept if c["method"] != "full")
    table = (out / "results.md").read_text()
    assert "python bench/quality.py --data" in table and "| full data |" in table and "| CCS |" in table

    # A rerun is served from OUT/cells and reports the same numbers.
    assert quality.main(argv) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second == first
    rerun = json.loads((out / "results.json").read_text())
    assert all(c["from_cell_cache"] for c in rerun["cells"])


def test_full_data_row_reuses_the_pipeline_surrogate(data_dir, tmp_path):
    """The full-data row comes from the surrogate the pipeline cached; it must be the very model
    surrogate_level trains on all users (same config and seed)."""
    quality = _quality_module()
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert quality.main(["--data", str(data_dir), "--methods", "el2n", "--seeds", "1", "--budgets", "10",
                         "--skip-ratio", "--epochs", "2", "--threads", "1", "--out", str(out),
                         "--cache-dir", str(cache), "--no-progress"]) == 0
    full = next(c for c in json.loads((out / "results.json").read_text())["cells"] if c["method"] == "full")
    assert full["notes"] == ["surrogate: pipeline cache"]

    ds = load_dataset(data_dir)
    cfg = PruneConfig.model_validate({"surrogate": {"epochs": 2}}).surrogate
    fresh = surrogate_level(ds, None, cfg, seed=0)
    assert fresh["metrics"] == full["eval"]["metrics"]
    assert fresh["best_epoch"] == full["eval"]["best_epoch"] and fresh["selected"] == ds.n_users


def test_length_matched_random_copies_the_history_lengths_of_its_reference(data_dir, tmp_path):
    """random+match=M: as many samples of each history length as M's selection of the same seed and
    budget, drawn at random within each length (seeded); its cell is keyed to M's configuration."""
    from bench.matched import history_lengths, length_matched_draw

    quality = _quality_module()
    ds = load_dataset(data_dir)
    lengths = history_lengths(ds)
    reference = [int(i) for i in np.argsort(-lengths, kind="stable")[:12]]  # the longest histories
    drawn = length_matched_draw(ds, reference, seed=3)
    assert sorted(lengths[drawn].tolist()) == sorted(lengths[reference].tolist())
    assert len(set(drawn)) == 12 and drawn == length_matched_draw(ds, reference, seed=3)
    mid = [int(i) for i in np.flatnonzero(lengths == np.bincount(lengths).argmax())[:2]]  # the commonest length
    assert {tuple(length_matched_draw(ds, mid, seed=s)) for s in range(8)} != {tuple(sorted(mid))}
    with pytest.raises(ValueError, match="distinct"):
        length_matched_draw(ds, [0, 0], seed=0)

    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--data", str(data_dir), "--methods", "el2n,random+match=el2n", "--seeds", "1", "--budgets", "10",
            "--skip-ratio", "--epochs", "2", "--threads", "1", "--out", str(out), "--cache-dir", str(cache),
            "--no-progress"]
    assert quality.main(argv) == 0
    cells = {c["method"]: c for c in (json.loads(p.read_text()) for p in (out / "cells").glob("*.json"))}
    el2n, matched = cells["el2n"]["selected"], cells["random+match=el2n"]["selected"]
    assert sorted(lengths[matched].tolist()) == sorted(lengths[el2n].tolist()) and len(matched) == 10
    assert "history lengths of el2n" in matched_note(cells["random+match=el2n"])
    assert "Random (history lengths of EL2N)" in (out / "results.md").read_text()
    for bad in ("random+match=random", "el2n+match=dealrec", "random+match=el2n+rank", "random+match=nope"):
        with pytest.raises(SystemExit):
            quality.parse_args(["--data", "d", "--methods", bad])


def matched_note(cell: dict) -> str:
    return " ".join(cell["notes"])


def test_surrogate_level_treats_the_selection_as_a_set(data_dir):
    ds = load_dataset(data_dir)
    cfg = SurrogateConfig(epochs=2, hidden_size=16, num_heads=2)
    a = surrogate_level(ds, [7, 3, 11, 3, 40], cfg, seed=0)
    b = surrogate_level(ds, [3, 7, 11, 40], cfg, seed=0)
    assert a["metrics"] == b["metrics"] and a["selected"] == 4
    assert set(a["metrics"]) == METRICS and a["test_users"] == ds.n_users and a["seconds"] > 0
    with pytest.raises(ValueError, match="empty"):
        surrogate_level(ds, [], cfg, seed=0)
    with pytest.raises(ValueError, match="must lie in"):
        surrogate_level(ds, [0, ds.n_users], cfg, seed=0)


@pytest.mark.parametrize("method,seed", [("dealrec", 0), ("el2n", 2), ("effort", 1)])
def test_bench_config_is_the_cli_config(method, seed):
    """The bench selects with exactly what `dealrec prune --method M --seed S --budget B` would use, so
    it shares core's cached surrogate, influence and effort with CLI runs (effort: one entry for all seeds)."""
    from core.cli import build_parser, prune_overrides
    from core.params import resolve

    quality = _quality_module()
    cli_args = build_parser().parse_args(["prune", "--data", "d", "--out", "o", "--method", method,
                                          "--seed", str(seed), "--budget", "256", "--epochs", "7"])
    bench_args = quality.parse_args(["--data", "d", "--epochs", "7"])
    assert quality.prune_config(bench_args, method, seed, 256) == resolve(prune_overrides(cli_args), n_samples=1000)
    assert quality.prune_config(bench_args, method, seed, 256).effort == quality.prune_config(bench_args, method, 0,
                                                                                               256).effort


def test_llm_eval_mode_fine_tunes_each_selection_and_pairs_the_users(data_dir, tmp_path, capsys):
    """--llm-eval: the base row plus one fine-tuned adapter per method, evaluated on the same test
    users; a rerun is served from OUT/llm-cells; the selections are the surrogate-level cells'."""
    from tiny_llm import tiny_model_folder

    quality = _quality_module()
    out, cache = tmp_path / "out", tmp_path / "cache"
    llm = tiny_model_folder(tmp_path / "tiny-llm")
    argv = ["--data", str(data_dir), "--llm-eval", "--llm", str(llm), "--methods", "random,el2n", "--budgets", "12",
            "--epochs", "2", "--llm-epochs", "2", "--llm-batch-size", "4", "--test-users", "9", "--num-beams", "2",
            "--max-new-tokens", "3", "--threads", "1", "--out", str(out), "--cache-dir", str(cache), "--no-progress",
            "--reference", "el2n", "--json"]

    assert quality.main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(first) == ["base", "random", "el2n"]
    assert all(set(row) == METRICS | {"rank_pct", "nll"} for row in first.values())
    for name in ("llm.md", "llm.png", "llm.json"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "llm.json").read_text())
    assert report["seeds"] == [0] and report["methods"] == ["random", "el2n"] and report["test_users"] == 9
    cells = {c["method"]: c for c in report["cells"]}
    assert cells["base"]["finetune"] is None
    for method in ("random", "el2n"):
        ft = cells[method]["finetune"]
        assert cells[method]["selected"] == 12 and ft["train_samples"] == 12 and ft["epochs_run"] == 2
        assert ft["steps"] == 6  # 12 samples, effective batch 4, 2 epochs
        # The selection fine-tuned on is the surrogate-level cell's.
        sel = json.loads(next((out / "cells").glob(f"{method}-seed0-b12-*.json")).read_text())["selected"]
        assert len(sel) == 12
    pair, pooled = report["paired"]["12"]
    assert pair["a"] == "random" and pair["b"] == "el2n" and pair["users"] == 9
    lo, hi = pair["recall@20"]["ci95"]
    assert lo <= pair["recall@20"]["diff"] <= hi
    # One seed: the pooled row is that seed's.
    assert pooled["seed"] == "all" and pooled["recall@20"]["diff"] == pair["recall@20"]["diff"]
    assert pooled["nll"]["diff"] == pytest.approx(pair["nll"]["diff"])
    assert pooled["rank_pct"]["diff"] == pytest.approx(pair["rank_pct"]["diff"])
    assert all(u["nll"] > 0 and u["answer_tokens"] >= 1 for c in saved_cells(out) for u in c["users"])
    # Every user has its whole-ranking place (the first-K rank where it has one agrees).
    assert all(0 <= u["rank_pct"] < 100 and (u["target_rank"] is None or u["target_rank"] == u["target_full_rank"])
               for c in saved_cells(out) for u in c["users"])
    saved = saved_cells(out)
    assert len({tuple(u["user"] for u in c["users"]) for c in saved}) == 1  # the same test users in every row
    # The adapters are kept beside the cells (committed with them, a later session resumes from them).
    assert len(list((out / "llm-adapters").glob("*/adapter_config.json"))) == 2
    # A finished cell's generation journal is gone (the cell holds everything it recorded).
    assert not list((out / "llm-cells").glob("*.partial.jsonl"))
    table = (out / "llm.md").read_text()
    assert "--llm-eval" in table and "| Random | 0 | 9 |" in table and "| base LLM (no fine-tuning) |" in table
    assert "| Random | **all** | 9 |" in table and "NLL difference" in table and "Rank % difference" in table
    assert "Smallest difference each pooled comparison detects" in table
    # The decision rule's verdict, in the report and its json.
    assert "## Decision" in table and "| Random | " in table.split("## Decision")[1]
    (verdict,) = report["decision"]["12"]
    assert verdict["method"] == "random" and verdict["reference"] == "el2n"
    assert verdict["beats"] == (min(verdict["p"].values()) < 0.05 and verdict["guard_ok"] is not False)

    assert quality.main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == first
    assert all(c["from_cell_cache"] for c in json.loads((out / "llm.json").read_text())["cells"])
    # --report names the files (a report over part of the cells beside the main one).
    assert quality.main([*argv, "--methods", "random", "--no-base", "--report", "llm-part"]) == 0
    capsys.readouterr()
    assert json.loads((out / "llm-part.json").read_text())["methods"] == ["random"]
    assert (out / "llm-part.md").is_file()
    assert json.loads((out / "llm.json").read_text())["methods"] == ["random", "el2n"]  # untouched


def saved_cells(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "llm-cells").glob("*.json"))]


def test_paired_test_interval_sign_flip_p_and_detectable_difference():
    from bench.paired import paired_test

    a = np.array([1.0, 0.0, 1.0, 0.0])
    b = np.zeros(4)
    res = paired_test(a, b, samples=4000)
    assert res["diff"] == pytest.approx(0.5) and res["users"] == 4 and res["per_seed"] == [0.5]
    assert 0.0 <= res["ci95"][0] <= 0.5 <= res["ci95"][1] <= 1.0
    # Under the null the two hits flip sign independently: a mean >= 0.5 needs both positive (1 in 4);
    # the bootstrap share on the wrong side of zero (1 in 16) would have claimed far more.
    assert res["p"] == pytest.approx(0.25, abs=0.03)
    assert res["p_worse"] == 1.0
    same = paired_test(a, a, samples=100)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["p"] == same["p_worse"] == 1.0
    with pytest.raises(ValueError, match="same"):
        paired_test(a, np.zeros(3))
    # The smallest detectable difference: (z .95 + z .80) sd / sqrt(n); four times the users, half of it.
    assert res["mde80"] == pytest.approx((1.6449 + 0.8416) * np.std(a, ddof=1) / 2)
    assert paired_test(np.tile(a, 4), np.zeros(16), samples=100)["mde80"] < res["mde80"] / 1.9
    assert same["mde80"] == 0.0


def test_paired_test_p_matches_the_exact_sign_flip_distribution_and_is_never_zero():
    import itertools

    from bench.paired import paired_test

    d = np.array([0.9, 0.4, -0.2, 0.7, 0.1])
    null = [np.mean(np.array(signs) * d) for signs in itertools.product((-1, 1), repeat=d.size)]
    exact = np.mean([m >= d.mean() - 1e-12 for m in null])
    res = paired_test(d, np.zeros_like(d), samples=20_000)
    assert res["p"] == pytest.approx(exact, abs=0.01)
    big = paired_test(np.ones(200), np.zeros(200), samples=999)
    assert big["p"] == pytest.approx(1 / 1000)  # (k + 1) / (B + 1): no draw is as extreme, still not 0


def test_paired_test_pools_seeds_by_user_skips_missing_values_and_mirrors_lower_is_better():
    from bench.paired import paired_test

    a = np.array([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # (seeds, users)
    b = np.zeros((2, 3))
    res = paired_test(a, b, samples=2000)
    assert res["diff"] == pytest.approx(0.5)  # users' seed means 1, 0, 0.5
    assert res["per_seed"] == pytest.approx([2 / 3, 1 / 3])
    low = paired_test(-a, b, samples=2000, lower_is_better=True)  # lower NLL is better
    assert low["diff"] == pytest.approx(-0.5) and low["p"] == res["p"] and low["p_worse"] == res["p_worse"]
    # A user without a value in any seed (NaN) is left out of every seed.
    gap = np.array([[1.0, np.nan, 1.0], [1.0, 0.0, 0.0]])
    res = paired_test(gap, b, samples=200)
    assert res["users"] == 2 and res["diff"] == pytest.approx(0.75) and res["per_seed"] == pytest.approx([1.0, 0.5])
    with pytest.raises(ValueError, match="no user"):
        paired_test(np.full(3, np.nan), np.zeros(3))


def test_holm_adjustment_and_the_decision_rule():
    from bench.paired import decide, holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # adjusted p never fall with a larger raw p

    def row(method, p_r, p_n, nll_p_worse, seeds=(0.01, 0.02, 0.005)):
        return {"a": method, "b": "random", "recall@20": {"p": p_r, "per_seed": list(seeds)},
                "ndcg@20": {"p": p_n, "per_seed": list(seeds)}, "nll": {"p_worse": nll_p_worse}}

    rows = [row("x", 0.004, 0.2, 0.5), row("y", 0.03, 0.3, 0.6), row("z", 0.01, 0.01, 0.001),
            row("w", 0.6, 0.7, 0.5, seeds=(0.01, -0.02, 0.0))]
    got = {d["method"]: d for d in decide(rows, ("recall@20", "ndcg@20"), "nll")}
    assert got["x"]["beats"] and got["x"]["beats_holm"]  # 0.004 x 8 = 0.032
    assert got["y"]["beats"] and not got["y"]["beats_holm"]  # significant alone, not in the family of 8
    assert not got["z"]["beats"] and got["z"]["guard_ok"] is False  # better on R@20, worse on the NLL
    assert not got["w"]["beats"] and not got["w"]["seeds_agree"] and got["x"]["seeds_agree"]
    assert got["x"]["best_metric"] == "recall@20"
    # Without the guard metric in the rows, the rule says so instead of passing it silently.
    (only,) = decide([{k: v for k, v in rows[0].items() if k != "nll"}], ("recall@20", "ndcg@20"), "nll")
    assert only["guard_ok"] is None and only["beats"]
    (single,) = decide([row("x", 0.004, 0.2, 0.5, seeds=(0.01,))], ("recall@20", "ndcg@20"), "nll")
    assert single["seeds_agree"] is None  # one seed: nothing to agree


def test_llm_reports_compare_the_rank_percentile_only_where_every_cell_has_it():
    """Cells written before the whole-ranking place was recorded have no rank_pct: a report mixing them
    with newer cells leaves that signal out instead of failing; among newer cells it is compared,
    lower is better."""
    from bench.llm_level import LLMCell, comparisons, summarize_llm

    def cell(nll, rank=None):
        users = [{"user": u, "nll": nll + 0.01 * u, **({"rank_pct": rank + u} if rank is not None else {})}
                 for u in range(6)]
        return {"users": users, "metrics": {}}

    old = {LLMCell("random", 0, 8): cell(3.0), LLMCell("dealrec", 0, 8): cell(2.9, rank=10.0)}
    summary = summarize_llm(old, ["random", "dealrec"], [0], 8, False)
    assert "rank_pct" not in summary["random"] and summary["dealrec"]["rank_pct"]["mean"] == pytest.approx(12.5)
    (pooled,) = [c for c in comparisons(old, ["random", "dealrec"], [0], 8, "random") if c["seed"] == "all"]
    assert "rank_pct" not in pooled and pooled["nll"]["diff"] == pytest.approx(-0.1)
    new = {LLMCell("random", 0, 8): cell(3.0, rank=20.0), LLMCell("dealrec", 0, 8): cell(2.9, rank=10.0)}
    assert summarize_llm(new, ["random", "dealrec"], [0], 8, False)["random"]["rank_pct"]["mean"] == pytest.approx(22.5)
    (pooled,) = [c for c in comparisons(new, ["random", "dealrec"], [0], 8, "random") if c["seed"] == "all"]
    # Every user 10 points better: only the all-negative flip (1 in 64) is as extreme.
    assert pooled["rank_pct"]["diff"] == pytest.approx(-10.0) and pooled["rank_pct"]["p"] < 0.03


def test_variant_specs_build_their_config_and_keep_the_plain_keys():
    quality = _quality_module()
    args = quality.parse_args(["--data", "d", "--methods", "dealrec,dealrec+resp+resid+robust,influence+hp=0"])
    assert args.methods == ["dealrec", "dealrec+resp+resid+robust", "influence+hp=0"]
    cfg = quality.prune_config(args, "dealrec+resp+resid+robust+lam=1", 1, 100)
    assert (cfg.selection.method, cfg.effort.loss, cfg.effort.length_correction, cfg.selection.normalize,
            cfg.selection.lam) == ("dealrec", "response", "residual", "robust", 1.0)
    assert quality.prune_config(args, "influence+hp=0", 0, 100).selection.hard_prune == 0.0
    assert quality.prune_config(args, "dealrec", 0, 100) == quality.prune_config(quality.parse_args(["--data", "d"]),
                                                                                  "dealrec", 0, 100)
    assert quality.label("dealrec+resp+lam=1") == "DEALRec (response loss, λ 1)"
    for bad in ("dealrec+nope", "nomethod", "dealrec+lam=x"):
        with pytest.raises(SystemExit):
            quality.parse_args(["--data", "d", "--methods", bad])


@pytest.mark.games
def test_committed_cells_keep_their_keys():
    """The committed 10,000-user cells are found under the keys today's code computes (a new option at
    its default must not move them)."""
    games = ROOT.parent / "shared" / "datasets" / "games"
    if not games.is_dir():
        pytest.skip(f"needs the Games dataset at {games}")
    quality = _quality_module()
    from bench import llm_level

    out = ROOT / "bench" / "results" / "quality-10000"
    ds = load_dataset(games, limit_users=10000)
    args = quality.parse_args(["--data", str(games), "--limit-users", "10000"])
    for method in quality.METHODS:
        for seed in range(3):
            assert quality.Cell(method, seed, 1024).path(out, ds, args).is_file(), (method, seed)
    llm_args = quality.parse_args(["--data", str(games), "--limit-users", "10000", "--llm-eval"])
    for method in ("dealrec", "random"):
        selected = json.loads(quality.Cell(method, 0, 1024).path(out, ds, args).read_text())["selected"]
        key = llm_level.LLMCell(method, 0, 1024).key(ds, llm_args, selected)
        assert list((out / "llm-cells").glob(f"{method}-seed0-b1024-{key}.json")), method


def test_llm_breakdown_quartiles_split_ties_and_average_the_groups():
    from bench.llm_breakdown import breakdown, quartiles

    x = np.array([0, 0, 0, 0, 0, 0, 5, 9], dtype=float)  # many equal values: still four groups of two
    groups = quartiles(x)
    assert [g.size for g in groups] == [2, 2, 2, 2]
    assert sorted(np.concatenate(groups).tolist()) == list(range(8))
    diff = np.arange(8, dtype=float)
    rows = breakdown(diff, {"x": x})["x"]
    assert [r["mean_diff"] for r in rows] == [0.5, 2.5, 4.5, 6.5]
    assert (rows[-1]["from"], rows[-1]["to"]) == (5.0, 9.0)


def test_llm_breakdown_token_table_orders_cells_and_correlates():
    from bench.llm_breakdown import token_table

    def cell(tokens, nll):
        return {"finetune": {"mean_train_tokens": tokens}, "users": [{"nll": nll - 0.1}, {"nll": nll + 0.1}]}

    cells = {("a", 0): cell(200.0, 3.70), ("b", 0): cell(150.0, 3.80), ("c", 1): cell(180.0, 3.75),
             ("base", 0): {"finetune": None, "users": [{"nll": 4.0}]}}
    rows, lines = token_table(cells)
    assert [(r["method"], r["seed"]) for r in rows] == [("b", 0), ("c", 1), ("a", 0)]  # fewest tokens first
    assert rows[0]["nll"] == pytest.approx(3.80)
    assert "Spearman correlation over the 3 cells: -1.00" in lines[2]
    assert token_table({("a", 0): cell(200.0, 3.7)})[1] == []  # too few cells for a correlation


def _cells_module():
    spec = importlib.util.spec_from_file_location("bench_cells", ROOT / "bench" / "cells.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cells_runner_plans_unfinished_cells_first_and_refuses_its_own_flags_after_the_separator(tmp_path):
    cells = _cells_module()
    (tmp_path / "llm-cells").mkdir()
    (tmp_path / "llm-cells" / "el2n-seed1-b12-0123.partial.jsonl").write_text("{}\n")
    jobs = cells.plan(["random", "el2n"], 2, ["12"], False, tmp_path)
    assert [j.label() for j in jobs] == ["el2n-seed1-b12", "random-seed0-b12", "el2n-seed0-b12", "random-seed1-b12"]
    assert jobs[0].argv(2) == ["--methods", "el2n", "--seeds", "2", "--budgets", "12", "--no-base", "--shard", "1/2"]
    assert cells.plan(["random"], 1, ["12"], True, None)[0].label() == "base"
    for bad in (["--methods", "random", "--", "--data", "d", "--seeds", "3"],
                ["--methods", "random", "--", "--out", "o"]):
        with pytest.raises(SystemExit):
            cells.parse_args(bad)


def test_cells_runner_runs_each_cell_in_its_own_process_then_the_report_and_resumes(data_dir, tmp_path):
    """Two cell processes at a time over 2 methods x 2 seeds: every cell lands under OUT/llm-cells, the
    report covers them all, and a rerun reads each back from the cell cache instead of recomputing."""
    from tiny_llm import tiny_model_folder

    cells = _cells_module()
    out, logs = tmp_path / "out", tmp_path / "logs"
    llm = tiny_model_folder(tmp_path / "tiny-llm")
    rest = ["--data", str(data_dir), "--llm", str(llm), "--epochs", "2", "--llm-epochs", "1", "--llm-batch-size", "4",
            "--test-users", "6", "--num-beams", "1", "--max-new-tokens", "2", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    argv = ["--procs", "2", "--methods", "random,el2n", "--seeds", "2", "--budgets", "12", "--log-dir", str(logs),
            "--", *rest]
    assert cells.main(argv) == 0
    saved = {p: p.stat().st_mtime_ns for p in (out / "llm-cells").glob("*.json")}
    assert sorted(p.name.split("-b12-")[0] for p in saved) == ["el2n-seed0", "el2n-seed1", "random-seed0",
                                                                 "random-seed1"]
    report = json.loads((out / "llm.json").read_text())
    assert report["seeds"] == [0, 1] and report["methods"] == ["random", "el2n"] and len(report["cells"]) == 4
    assert sorted(p.name for p in logs.iterdir()) == ["el2n-seed0-b12.log", "el2n-seed1-b12.log",
                                                      "random-seed0-b12.log", "random-seed1-b12.log"]

    assert cells.main([*argv[:-len(rest) - 1], "--no-report", "--", *rest]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "llm-cells").glob("*.json")} == saved
    assert all("[from cell cache]" in p.read_text() for p in logs.iterdir())
