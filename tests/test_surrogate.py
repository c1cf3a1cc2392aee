"""Surrogate stage: metrics, top-K exclusion, training (learns, deterministic, cancellable), checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.config import SurrogateConfig
from core.data.dataset import RecDataset
from core.surrogate.metrics import recall_ndcg_at_k, topk_excluding
from core.surrogate.train import Cancelled, evaluate, load_checkpoint, save_checkpoint, train_surrogate

torch.set_num_threads(1)

N_ITEMS = 40


def _cyclic_dataset(n_users: int = 300, seed: int = 0, noise: float = 0.1) -> RecDataset:
    """Users walk the item cycle i -> i+1 (mod N_ITEMS) from a random start; `noise` of the steps are
    replaced by a random item. The last two items are valid and test."""
    rng = np.random.default_rng(seed)
    train, valid, test = [], [], []
    for _ in range(n_users):
        length = int(rng.integers(5, 16))
        start = int(rng.integers(0, N_ITEMS))
        seq = [(start + j) % N_ITEMS + 1 for j in range(length)]
        for j in range(length - 2):  # keep valid/test on the pattern so the task is learnable
            if rng.random() < noise:
                seq[j] = int(rng.integers(1, N_ITEMS + 1))
        train.append(tuple(seq[:-2]))
        valid.append((seq[-2],))
        test.append((seq[-1],))
    return RecDataset(
        user_ids=tuple(f"u{u}" for u in range(n_users)),
        item_ids=tuple(f"i{i}" for i in range(1, N_ITEMS + 1)),
        item_titles=tuple(f"Item {i}" for i in range(1, N_ITEMS + 1)),
        train=tuple(train), valid=tuple(valid), test=tuple(test),
    )


def _small_cfg(**overrides) -> SurrogateConfig:
    base = dict(hidden_size=32, num_layers=1, num_heads=2, dropout=0.1, attention_dropout=0.1,
                max_seq_length=16, lr=5e-3, batch_size=32, epochs=10, eval_every=1, patience=10)
    base.update(overrides)
    return SurrogateConfig(**base)


@pytest.fixture(scope="module")
def cyclic() -> RecDataset:
    return _cyclic_dataset()


@pytest.fixture(scope="module")
def trained(cyclic):
    return train_surrogate(cyclic, _small_cfg(), seed=0)


# ---------------------------------------------------------------------------------------- metrics


def test_metrics_hand_computed():
    ranked = np.array([
        [3, 5, 7, 1],   # truth {3, 7}: hits at ranks 0 and 2
        [1, 2, 9, 4],   # truth {9}: hit at rank 2
        [6, 8, 2, 3],   # empty truth: not counted
    ])
    m = recall_ndcg_at_k(ranked, [{3, 7}, [9, 9], set()], ks=(2, 3))
    idcg2 = 1.0 + 1.0 / math.log2(3)
    # K=2: user A recall 1/2, DCG 1; user B nothing.
    assert m["recall@2"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["ndcg@2"] == pytest.approx((1.0 / idcg2 + 0.0) / 2)
    # K=3: user A recall 1, DCG 1 + 1/log2(4) = 1.5; user B recall 1, DCG 1/2, IDCG 1.
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx((1.5 / idcg2 + 0.5) / 2)
    assert set(m) == {"recall@2", "ndcg@2", "recall@3", "ndcg@3"}


def test_metrics_idcg_is_capped_at_k_and_no_item_never_hits():
    # 3 relevant items, K = 2, both top slots hit: NDCG must be exactly 1, recall 2/3.
    m = recall_ndcg_at_k(np.array([[4, 5, 6]]), [{4, 5, 6}], ks=(2,))
    assert m["ndcg@2"] == pytest.approx(1.0)
    assert m["recall@2"] == pytest.approx(2 / 3)
    # -1 ("no item") must not collide with the previous user's items in the key encoding.
    m = recall_ndcg_at_k(np.array([[1, 2], [-1, -1]]), [{3}, {1}], ks=(2,))
    assert m["recall@2"] == 0.0


def test_metrics_no_user_with_truth_and_shape_checks():
    assert recall_ndcg_at_k(np.array([[1, 2]]), [set()], ks=(1,)) == {"recall@1": 0.0, "ndcg@1": 0.0}
    with pytest.raises(ValueError):
        recall_ndcg_at_k(np.array([[1, 2]]), [{1}], ks=(3,))


def test_topk_excluding_never_returns_excluded_or_padding():
    # All scores negative except padding and excluded items, which are the highest: the reference's
    # "set to 0" masking would rank the excluded items first.
    scores = -torch.arange(1.0, 7.0).repeat(2, 1)  # 2 users, items 0..5, item 1 best among real ones
    scores[:, 0] = 10.0
    scores[0, 2] = 5.0
    original = scores.clone()
    top = topk_excluding(scores, [[1, 2], {4}], k=3)
    assert top.tolist() == [[3, 4, 5], [1, 2, 3]]
    assert torch.equal(scores, original)  # input untouched
    # k larger than what is left: padded with -1, still no excluded item nor 0.
    top = topk_excluding(scores, [[1, 2], {4}], k=6)
    assert top.shape == (2, 6)
    assert top[0].tolist() == [3, 4, 5, -1, -1, -1]
    assert 0 not in top and 4 not in top[1]


# ---------------------------------------------------------------------------------------- training


def test_training_beats_random_baseline(cyclic, trained):
    model, report = trained
    valid = report["valid"]
    # Expected Recall@10 of a random ranking over each user's non-excluded items (one truth item).
    rand = np.mean([min(10, N_ITEMS - len(set(t))) / (N_ITEMS - len(set(t))) for t in cyclic.train])
    assert valid["users"] == cyclic.n_users
    assert valid["recall@10"] > rand + 0.3, (valid, rand)
    assert report["test"]["recall@10"] > rand + 0.3
    assert not model.training
    assert 1 <= report["best_epoch"] <= report["epochs_run"] <= 10
    assert report["valid"]["recall@20"] == max(h["recall@20"] for h in report["history"])
    # The returned model is the best epoch's: re-evaluating gives the recorded validation metrics.
    assert evaluate(model, cyclic, "valid")["recall@20"] == pytest.approx(valid["recall@20"])


def test_training_is_deterministic(cyclic):
    cfg = _small_cfg(epochs=2)
    a, ra = train_surrogate(cyclic, cfg, seed=3)
    b, rb = train_surrogate(cyclic, cfg, seed=3)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert ra["valid"] == rb["valid"]
    c, _ = train_surrogate(cyclic, cfg, seed=4)
    assert not torch.equal(a.item_embeddings.weight, c.item_embeddings.weight)


def test_early_stop_progress_and_subset(cyclic):
    calls: list[tuple[float, str]] = []
    subset = list(range(0, 300, 3))
    # lr 0 never improves: stops after `patience` evaluations past the first.
    _, report = train_surrogate(cyclic, _small_cfg(lr=1e-12, epochs=20, patience=2), seed=0,
                                progress=lambda f, m: calls.append((f, m)), train_users=subset)
    assert report["stopped_early"]
    assert report["epochs_run"] < 20
    assert report["train_users"] == len(subset)
    assert report["valid"]["users"] == len(subset)
    assert report["test"]["users"] == cyclic.n_users  # test is always over every user
    fractions = [f for f, _ in calls]
    assert len(calls) == report["epochs_run"]
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)


def test_cancel_raises(cyclic):
    n = {"calls": 0}

    def cancel() -> bool:
        n["calls"] += 1
        return n["calls"] > 3

    with pytest.raises(Cancelled):
        train_surrogate(cyclic, _small_cfg(), seed=0, cancel=cancel)
    assert n["calls"] == 4  # checked between batches, not only between epochs


def test_evaluate_excludes_seen_items_and_skips_empty_truth(cyclic, trained):
    model, _ = trained
    # Test input is train + valid; users 0..9 only; one user without test truth does not count.
    ds = RecDataset(user_ids=cyclic.user_ids[:3], item_ids=cyclic.item_ids, item_titles=cyclic.item_titles,
                    train=cyclic.train[:3], valid=cyclic.valid[:3], test=cyclic.test[:2] + ((),))
    res = evaluate(model, ds, "test", ks=(5,))
    assert res["users"] == 2
    assert evaluate(model, cyclic, "test", users=range(10))["users"] == 10


# ---------------------------------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip(tmp_path, cyclic, trained):
    model, report = trained
    path = tmp_path / "sub" / "surrogate.pt"
    save_checkpoint(model, path, {"seed": 0, "valid": report["valid"], "fingerprint": cyclic.fingerprint})
    assert [p.name for p in path.parent.iterdir()] == ["surrogate.pt"]  # no temporary file left
    loaded, extra = load_checkpoint(path)
    assert extra["fingerprint"] == cyclic.fingerprint and extra["valid"] == report["valid"]
    assert loaded.cfg == model.cfg and not loaded.training
    seqs = torch.tensor([[0, 0, 1, 2, 3], [5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(loaded.score_all(loaded(seqs)), model.score_all(model(seqs)))
    with pytest.raises(TypeError):
        save_checkpoint(model, path, {"bad": np.float32(1.0)})
    assert [p.name for p in path.parent.iterdir()] == ["surrogate.pt"]
