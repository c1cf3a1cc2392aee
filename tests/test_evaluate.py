"""BIGRec LLM-level evaluation on a tiny random Llama (grounding by embedding distance, Recall/NDCG),
and the `dealrec finetune` / `dealrec evaluate` commands on a synthetic dataset."""

import json

import numpy as np
import pytest
import torch
from tiny_llm import NUMBER_WORDS, tiny_dataset, tiny_llama, tiny_model_folder, tiny_tokenizer

import core.evaluate.bigrec as bigrec
from core.cli import main
from core.config import LLMEvalConfig
from core.data.synthetic import dealrec_layout_files
from core.effort.prompts import PromptTemplate, make_record, tokenize_samples
from core.evaluate.bigrec import (
    EvaluationCancelled,
    embed_texts,
    evaluate_llm,
    full_ranks,
    rank_by_distance,
    select_test_users,
)
from core.evaluate.generate import GenerationResult
from core.evaluate.generate import generate_plain as generate_texts
from core.surrogate.metrics import recall_ndcg_at_k


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer(NUMBER_WORDS)
    return tok, tiny_llama(len(tok)), tiny_dataset(20, with_eval=True)


def test_embedding_is_the_last_real_token_and_batch_independent(tiny):
    tok, model, ds = tiny
    texts = list(ds.item_titles) + ["zelda mario halo doom sonic tetris", ""]
    one = embed_texts(model, tok, texts, batch_size=1)
    many = embed_texts(model, tok, texts, batch_size=4)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)
    ids = tok(texts[2], return_tensors="pt")
    with torch.no_grad():
        ref = model(**ids, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(one[2], ref, rtol=1e-5, atol=1e-5)
    assert one.shape == (len(texts), model.config.hidden_size)


def test_a_generated_title_grounds_to_its_item_at_rank_one(tiny):
    tok, model, ds = tiny
    items = embed_texts(model, tok, ds.item_titles, batch_size=3)
    queries = embed_texts(model, tok, list(reversed(ds.item_titles)), batch_size=5)
    ranked = rank_by_distance(queries, items, k=3)
    n = len(ds.item_titles)
    assert ranked[:, 0].tolist() == list(reversed(range(n)))


def test_rank_by_distance_order_ties_and_exclusion():
    items = torch.tensor([[0.0], [1.0], [3.0], [-1.0], [10.0]])
    queries = torch.tensor([[0.9], [2.0]])
    # 2.0 is as far from item 1 as from item 2: the tie goes to the lower index.
    assert rank_by_distance(queries, items, 5).tolist() == [[1, 0, 3, 2, 4], [1, 2, 0, 3, 4]]
    assert rank_by_distance(queries, items, 3, exclude=[[1], []]).tolist() == [[0, 3, 2], [1, 2, 0]]
    assert rank_by_distance(queries[:1], items, 7, exclude=[[0, 1]]).tolist() == [[3, 2, 4, -1, -1, -1, -1]]


def test_full_ranks_are_positions_in_the_whole_ranking():
    items = torch.tensor([[0.0], [1.0], [3.0], [-1.0], [10.0]])
    queries = torch.tensor([[0.9], [2.0]])
    # Whole rankings: [1, 0, 3, 2, 4] and [1, 2, 0, 3, 4] (the tie at 2.0 to the lower index).
    assert full_ranks(queries, items, [[4], [2]]) == [(4, 5), (1, 5)]
    assert full_ranks(queries, items, [[2, 3], [4, 0]]) == [(2, 5), (2, 5)]  # the best-placed target
    # Excluded rows are not ranked and do not count; a query whose targets are all excluded has none.
    assert full_ranks(queries, items, [[4], [1]], exclude=[[1, 0], [1]]) == [(2, 3), None]
    # Against a full argsort of random data with ties, in chunks smaller than the queries.
    gen = torch.Generator().manual_seed(0)
    items = torch.randint(0, 4, (40, 3), generator=gen).float()
    queries = torch.randint(0, 4, (9, 3), generator=gen).float()
    targets = [[int(t) for t in torch.randint(0, 40, (2,), generator=gen)] for _ in range(9)]
    whole = rank_by_distance(queries, items, 40)
    expected = [(min(whole[q].tolist().index(t) for t in targets[q]), 40) for q in range(9)]
    assert full_ranks(queries, items, targets, chunk=4) == expected


def test_recall_ndcg_match_hand_computed_values():
    # Items on a line; queries rank them by distance; truths chosen by hand.
    items = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    queries = torch.tensor([[0.1], [3.9], [2.2]])
    ranked = rank_by_distance(queries, items, 3) + 1  # 1-based ids
    assert ranked.tolist() == [[1, 2, 3], [5, 4, 3], [3, 4, 2]]
    truths = [(2,), (3, 5), (1,)]
    got = recall_ndcg_at_k(ranked, truths, ks=(1, 3))
    log2 = np.log2
    # user 0: hit at rank 2; user 1: hits at ranks 1 and 3 of 2 truths; user 2: no hit.
    assert got["recall@1"] == pytest.approx((0 + 0.5 + 0) / 3)
    assert got["recall@3"] == pytest.approx((1 + 1 + 0) / 3)
    assert got["ndcg@1"] == pytest.approx((0 + 1 + 0) / 3)
    ndcg3_u0 = (1 / log2(3)) / 1
    ndcg3_u1 = (1 + 1 / log2(4)) / (1 + 1 / log2(3))
    assert got["ndcg@3"] == pytest.approx((ndcg3_u0 + ndcg3_u1 + 0) / 3)


def test_generation_does_not_depend_on_the_batch(tiny):
    """Left padding with a correct attention mask: the same text alone or in a batch."""
    tok, model, ds = tiny
    prompts = [s.ids for s in tokenize_samples(ds, range(6), tok, 256, split="test")]
    for beams in (1, 2):
        alone = generate_texts(model, tok, prompts, num_beams=beams, max_new_tokens=5, batch_size=1)
        together = generate_texts(model, tok, prompts, num_beams=beams, max_new_tokens=5, batch_size=6)
        assert alone == together and all(isinstance(t, str) for t in alone)


def test_test_prompt_history_is_train_plus_valid(tiny):
    tok, _, ds = tiny
    u = next(u for u in range(ds.n_users) if ds.valid[u] and ds.test[u])
    rec = make_record(ds, u, PromptTemplate(), split="test")
    titles = "; ".join(ds.item_titles[i - 1] for i in ds.train[u] + ds.valid[u])
    assert rec.input.endswith(titles) and rec.output == ""
    assert rec.prompt().endswith("### Response:\n")
    sample = tokenize_samples(ds, [u], tok, 512, split="test")[0]
    assert sample.ids[-1] != tok.eos_token_id
    assert list(sample.ids) == tok(rec.prompt())["input_ids"]
    short = tokenize_samples(ds, [u], tok, len(sample.ids) - 2, split="test")[0]
    assert len(short.ids) <= len(sample.ids) - 2 and short.kept < sample.kept


def test_select_test_users(tiny):
    _, _, ds = tiny
    all_users = select_test_users(ds)
    assert all_users == [u for u in range(ds.n_users) if ds.test[u]] and len(all_users) < ds.n_users
    sub = select_test_users(ds, 5, seed=3)
    assert len(sub) == 5 and set(sub) <= set(all_users) and sub == sorted(sub)
    assert sub == select_test_users(ds, 5, seed=3) and sub != select_test_users(ds, 5, seed=4)
    assert select_test_users(ds, 10_000) == all_users


def test_evaluate_with_perfect_generation_scores_one(tiny, monkeypatch):
    """When the LLM writes exactly the test item's title, grounding puts it first: Recall@K = NDCG@K = 1."""
    tok, model, ds = tiny

    def perfect(model, tokenizer, prompts, answers=None, **kw):
        texts = [ds.item_titles[ds.test[u][0] - 1] for u in select_test_users(ds)]
        return GenerationResult(texts, [0.0] * len(texts), [1] * len(texts), len(texts), 1.0)

    monkeypatch.setattr(bigrec, "generate_batched", perfect)
    res = evaluate_llm(model, tok, ds, LLMEvalConfig())
    m = res["metrics"]
    assert m["users"] == len(select_test_users(ds))
    assert all(m[f"{x}@{k}"] == pytest.approx(1.0) for k in (10, 20, 50) for x in ("recall", "ndcg"))
    assert all(p["target_rank"] == 0 and p["target_full_rank"] == 0 and p["rank_pct"] == 0.0
               for p in res["predictions"])
    assert m["rank_pct"] == 0.0
    # Excluding seen items (not the reference's default) drops a test item the user had already bought.
    res = evaluate_llm(model, tok, ds, LLMEvalConfig(exclude_seen=True))
    unseen = [ds.test[u][0] not in ds.train[u] + ds.valid[u] for u in select_test_users(ds)]
    assert 0 < sum(unseen) < len(unseen)
    assert res["metrics"]["recall@50"] == pytest.approx(np.mean(unseen))


def test_evaluate_end_to_end_and_cancel(tiny):
    tok, model, ds = tiny
    cfg = LLMEvalConfig(num_beams=2, max_new_tokens=4, test_users=6)
    stages = []
    res = evaluate_llm(model, tok, ds, cfg, progress=lambda s, f, m: stages.append(s))
    assert res["metrics"]["users"] == 6 and len(res["predictions"]) == 6
    assert set(stages) == {"items", "generate", "ground"}
    for p in res["predictions"]:
        if p["target_rank"] is not None and p["target_rank"] < 10:
            assert p["top10"][p["target_rank"]] in p["targets"]
        # The whole-ranking position agrees with the first-K one where that has it.
        if p["target_rank"] is not None:
            assert p["target_full_rank"] == p["target_rank"]
        else:
            assert p["target_full_rank"] >= 50
        assert p["rank_pct"] == pytest.approx(100 * p["target_full_rank"] / len(ds.item_titles))
    assert np.mean([p["rank_pct"] for p in res["predictions"]]) == pytest.approx(res["metrics"]["rank_pct"])
    # Each user's own metrics average to the reported ones (paired comparisons rely on that).
    for key, value in res["metrics"].items():
        if key not in ("users", "nll", "rank_pct"):
            assert np.mean([p["metrics"][key] for p in res["predictions"]]) == pytest.approx(value)
    assert np.mean([p["nll"] for p in res["predictions"]]) == pytest.approx(res["metrics"]["nll"])
    assert all(p["nll"] > 0 and p["answer_tokens"] > 1 for p in res["predictions"])
    with pytest.raises(EvaluationCancelled):
        evaluate_llm(model, tok, ds, cfg, cancel=lambda: True)


# ------------------------------------------------------------------------------------------------
# The commands


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    data.mkdir()
    for name, content in dealrec_layout_files(n_users=30, n_items=25, seed=1).items():
        (data / name).write_bytes(content)
    model = tiny_model_folder(root / "tiny-llm")
    return root, data, model


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_finetune_then_evaluate(workspace, capsys):
    root, data, llm = workspace
    common = ["--threads", "1", "--cache-dir", root / "cache", "--no-progress"]
    code, _, err = run(capsys, "prune", "--data", data, "--limit-users", 24, "--method", "random", "--budget", 10,
                       "--llm", llm, "--out", root / "sel", *common)
    assert code == 0, err

    code, out, err = run(capsys, "finetune", "--data", data, "--selection", root / "sel", "--out", root / "adapter",
                         "--epochs", 2, "--batch-size", 4, "--micro-batch-size", 2, "--lr", "5e-3", "--warmup-steps", 1,
                         *common)
    assert code == 0, err
    meta = json.loads((root / "adapter" / "finetune.json").read_text())
    assert (root / "adapter" / "adapter_config.json").is_file()
    sel = json.loads((root / "sel" / "selection.json").read_text())
    assert meta["dataset_fingerprint"] == sel["dataset_fingerprint"]
    assert meta["train_samples"] == 10 and meta["epochs_run"] == 2 and meta["steps"] == 6
    assert meta["recipe"]["lr"] == 5e-3 and meta["recipe"]["lora"]["r"] == 8 and meta["seed"] == 0
    assert meta["base_model"]["llm"] == str(llm) and meta["selection"]["limit_users"] == 24
    assert len(meta["history"]) == 2 and meta["seconds"] > 0 and "fine-tuned on 10 samples" in out

    # The records trained on are the selection's bigrec_train.jsonl.
    from core.data import load_dataset
    from core.effort.llm import load_tokenizer, resolve_llm
    from core.finetune import encode_records, encode_users, selection_fingerprint

    ds = load_dataset(str(data), limit_users=24)
    tok = load_tokenizer(resolve_llm(str(llm)))
    users = sorted(s["index"] for s in sel["selected"])
    records = [json.loads(line) for line in (root / "sel" / "bigrec_train.jsonl").read_text().splitlines()]
    by_index = dict(zip([s["index"] for s in sel["selected"]], records))
    assert encode_records([by_index[u] for u in users], tok, 512) == encode_users(ds, users, tok, 512)
    chosen = [s["user_id"] for s in sel["selected"]]
    assert meta["selection_fingerprint"] == selection_fingerprint(ds.fingerprint, chosen)

    for which in (["--adapter", root / "adapter"], ["--base-only", "--llm", llm]):
        out_dir = root / ("eval-" + which[0].strip("-"))
        code, out, err = run(capsys, "evaluate", "--data", data, *which, "--limit-users", 24, "--test-users", 5,
                             "--num-beams", 2, "--max-new-tokens", 4, "--out", out_dir, *common)
        assert code == 0, err
        metrics = json.loads((out_dir / "metrics.json").read_text())
        assert metrics["users"] == 5
        assert all(0.0 <= metrics[f"{m}@{k}"] <= 1.0 for k in (10, 20, 50) for m in ("recall", "ndcg"))
        assert len((out_dir / "predictions.jsonl").read_text().splitlines()) == 5
        assert "recall@10" in out


def test_cli_finetune_and_evaluate_resume_after_ctrl_c(workspace, capsys, monkeypatch):
    """Ctrl-C keeps fine-tuning's checkpoint and evaluation's generation journal; the same command
    run again goes on from them and ends where an uninterrupted run does."""
    import core.evaluate.journal as journal_mod
    import core.finetune as finetune_mod

    root, data, llm = workspace
    common = ["--threads", "1", "--cache-dir", root / "cache", "--no-progress"]
    assert run(capsys, "prune", "--data", data, "--limit-users", 24, "--method", "random", "--budget", 10,
               "--llm", llm, "--out", root / "sel-r", *common)[0] == 0
    train = ["--data", data, "--selection", root / "sel-r", "--epochs", 2, "--batch-size", 4, "--micro-batch-size", 2,
             "--lr", "5e-3", "--warmup-steps", 1, *common]
    assert run(capsys, "finetune", *train, "--out", root / "whole")[0] == 0

    real_save = finetune_mod.save_checkpoint

    def save_then_interrupt(*a, **kw):  # the checkpoint at epoch 1's end is written, then Ctrl-C
        real_save(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_mod, "save_checkpoint", save_then_interrupt)
    code, _, err = run(capsys, "finetune", *train, "--out", root / "cut")
    assert code == 130 and "rerun the same command to resume" in err
    assert (root / "cut.resume.pt").is_file() and not (root / "cut" / "finetune.json").exists()
    monkeypatch.setattr(finetune_mod, "save_checkpoint", real_save)
    assert run(capsys, "finetune", *train, "--out", root / "cut")[0] == 0
    assert not (root / "cut.resume.pt").exists()
    whole, cut = (json.loads((root / d / "finetune.json").read_text()) for d in ("whole", "cut"))
    assert cut["history"] == whole["history"] and cut["steps"] == whole["steps"]

    evaluate = ["--data", data, "--adapter", root / "cut", "--limit-users", 24, "--test-users", 9, "--num-beams", 2,
                "--max-new-tokens", 4, "--batch-size", 2, *common]
    assert run(capsys, "evaluate", *evaluate, "--out", root / "eval-whole")[0] == 0
    real_record = journal_mod.GenerationJournal.record

    def record_then_interrupt(self, *a, **kw):  # the first batch is journaled, then Ctrl-C
        real_record(self, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(journal_mod.GenerationJournal, "record", record_then_interrupt)
    code, _, err = run(capsys, "evaluate", *evaluate, "--out", root / "eval-cut")
    assert code == 130 and "rerun the same command to resume" in err
    partial = root / "eval-cut" / "predictions.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 2  # the header and one batch
    monkeypatch.setattr(journal_mod.GenerationJournal, "record", real_record)
    assert run(capsys, "evaluate", *evaluate, "--out", root / "eval-cut")[0] == 0
    assert not partial.exists()
    got, want = ((root / d / "predictions.jsonl").read_text() for d in ("eval-cut", "eval-whole"))
    assert got == want


def test_cli_bad_input_is_one_message_and_exit_2(workspace, capsys, tmp_path):
    root, data, llm = workspace
    common = ["--threads", "1", "--cache-dir", root / "cache", "--no-progress", "--llm", llm]
    code, _, err = run(capsys, "finetune", "--data", data, "--selection", tmp_path, "--out", tmp_path / "a", *common)
    assert code == 2 and "has no selection.json" in err and "Traceback" not in err

    sel = tmp_path / "sel"
    sel.mkdir()
    (sel / "selection.json").write_text(json.dumps({"dataset_fingerprint": "0" * 32, "params": {"limit_users": 10},
                                                    "selected": [{"index": 0, "user_id": "U0001"}]}))
    code, _, err = run(capsys, "finetune", "--data", data, "--selection", sel, "--out", tmp_path / "a", *common)
    assert code == 2 and "another dataset" in err
    code, _, err = run(capsys, "finetune", "--data", data, "--selection", sel, "--limit-users", 12,
                       "--out", tmp_path / "a", *common)
    assert code == 2 and "differs from the selection's" in err
    code, _, err = run(capsys, "finetune", "--data", data, "--selection", sel, "--micro-batch-size", 256,
                       "--out", tmp_path / "a", *common)
    assert code == 2 and "micro_batch_size" in err

    code, _, err = run(capsys, "evaluate", "--data", data, "--adapter", tmp_path, "--out", tmp_path / "e", *common)
    assert code == 2 and "adapter_config.json" in err
    code, _, err = run(capsys, "evaluate", "--data", data, "--base-only", "--num-beams", 0, "--out", tmp_path / "e",
                       *common)
    assert code == 2 and "num_beams" in err
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--data", str(data), "--out", str(tmp_path / "e")])  # neither --adapter nor --base-only
    assert exc.value.code == 2


def test_nll_only_evaluation_generates_nothing(tiny):
    tok, model, ds = tiny
    full = evaluate_llm(model, tok, ds, LLMEvalConfig(num_beams=1, max_new_tokens=3, test_users=6))
    only = evaluate_llm(model, tok, ds, LLMEvalConfig(generate=False, test_users=6))
    assert set(only["metrics"]) == {"users", "nll"} and only["metrics"]["users"] == 6
    assert only["metrics"]["nll"] == pytest.approx(full["metrics"]["nll"], rel=1e-5)
    assert [p["nll"] for p in only["predictions"]] == pytest.approx([p["nll"] for p in full["predictions"]], rel=1e-5)
    assert "generated" not in only["predictions"][0] and only["generation"]["new_tokens"] == 0
    with pytest.raises(ValueError, match="needs nll"):
        LLMEvalConfig(generate=False, nll=False)
