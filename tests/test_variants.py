"""The principled variants of the selection: the effort length correction and the per-score
normalisations, on pools with a known answer."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from core.config import PruneConfig, SelectionConfig, key_dump
from core.effort.length import correct_effort, length_residual
from core.selection import normalize, rank_normalize, robust_normalize, select


def planted_pool(n=4000, seed=0):
    """Effort that falls with prompt length (a power law with a bend, as on real prompts) times an
    independent difficulty that the correction must keep."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(80, 512, size=n)
    difficulty = rng.lognormal(0.0, 0.5, size=n)
    log_t = np.log(tokens)
    effort = np.exp(-1.3 * log_t + 0.25 * (log_t - log_t.mean()) ** 2) * difficulty
    return effort, tokens, difficulty


def test_residual_removes_a_planted_length_effect_and_keeps_the_rest():
    effort, tokens, difficulty = planted_pool()
    assert spearmanr(effort, tokens).statistic < -0.5
    res = length_residual(effort, tokens)
    assert abs(spearmanr(res, tokens).statistic) < 0.05
    assert spearmanr(res, difficulty).statistic > 0.95
    assert np.isfinite(res).all() and abs(res.mean()) < 1e-9


def test_residual_edge_cases():
    assert length_residual(np.array([]), np.array([])).size == 0
    one_length = length_residual(np.array([1.0, 2.0, 4.0]), np.array([10, 10, 10]))
    np.testing.assert_allclose(one_length, np.log([1.0, 2.0, 4.0]) - np.log([1.0, 2.0, 4.0]).mean())
    zero = length_residual(np.array([0.0, 1.0, 2.0, 3.0]), np.array([5, 6, 7, 8]))
    assert np.isfinite(zero).all()
    with pytest.raises(ValueError):
        length_residual(np.array([1.0, -1.0]), np.array([3, 4]))
    with pytest.raises(ValueError):
        length_residual(np.array([1.0, 2.0]), np.array([3]))
    with pytest.raises(ValueError):
        correct_effort(np.array([1.0]), None, "residual")
    np.testing.assert_array_equal(correct_effort(np.array([3.0, 1.0]), None, "none"), [3.0, 1.0])


@pytest.mark.parametrize("how", ["minmax", "rank", "robust"])
def test_normalisations_are_monotone_and_bounded(how):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_t(1.5, size=2000), [1e6, -1e5]])  # heavy tails, two outliers
    y = normalize(x, how)
    assert y.min() == pytest.approx(0.0) and y.max() == pytest.approx(1.0)
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(y[order]) >= 0)  # never reverses an order
    if how != "minmax":
        # The outliers no longer squeeze the middle half into a sliver of [0, 1].
        iqr = np.subtract(*np.percentile(y, [75, 25]))
        assert iqr > 100 * np.subtract(*np.percentile(normalize(x, "minmax"), [75, 25]))
    np.testing.assert_array_equal(normalize(np.array([2.0, 2.0]), how), [0.0, 0.0])


def test_rank_and_robust_details():
    np.testing.assert_allclose(rank_normalize(np.array([10.0, 30.0, 20.0, 20.0])), [0.0, 1.0, 0.5, 0.5])
    x = np.arange(101, dtype=float)
    x[-1] = 1e9
    y = robust_normalize(x)
    assert y[-1] == 1.0 and y[0] == 0.0 and y[50] == pytest.approx(49 / 98, abs=0.02)
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalize(x, "zscore")


def test_normalize_option_changes_only_what_it_should():
    rng = np.random.default_rng(3)
    scores = {"influence": rng.standard_t(1.5, size=3000), "effort": rng.lognormal(size=3000)}
    base = select("dealrec", scores, SelectionConfig(budget=200))
    same = select("dealrec", scores, SelectionConfig(budget=200, normalize="minmax"))
    np.testing.assert_array_equal(base.selected, same.selected)
    robust = select("dealrec", scores, SelectionConfig(budget=200, normalize="robust"))
    assert len(robust.selected) == 200 and not np.array_equal(np.sort(base.selected), np.sort(robust.selected))


def test_new_options_at_their_defaults_keep_old_keys():
    """A field added later is left out of key dumps while it holds its default: committed cache entries
    and bench cells stay valid (their keys hash the dumps from before the field existed)."""
    dump = key_dump(PruneConfig(), mode="json")
    assert "normalize" not in dump["selection"] and "loss" not in dump["effort"]
    assert "length_correction" not in dump["effort"]
    changed = key_dump(PruneConfig.model_validate({"selection": {"normalize": "rank"}, "effort": {"loss": "response"}}))
    assert changed["selection"]["normalize"] == "rank" and changed["effort"]["loss"] == "response"
