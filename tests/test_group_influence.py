"""Group influence with bootstrap intervals, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest

from engine.group_influence import bootstrap_interval, group_effects, group_sums


def _scores(seed: int = 0, n_test: int = 50, m: int = 300):
    rng = np.random.default_rng(seed)
    pre = rng.normal(size=(n_test, m))
    ft = rng.normal(size=(n_test, m)) * 0.3
    return {"pretrained_term": pre, "finetuned_term": ft, "total": pre + ft}


def test_group_sums_match_direct_sums():
    s = _scores()
    codes = np.random.default_rng(1).integers(0, 7, size=300)
    rows = np.array([3, 0, 49, 17])
    got = group_sums(s["total"], codes, 7, rows)
    for g in range(7):
        np.testing.assert_allclose(got[:, g], s["total"][rows][:, codes == g].sum(axis=1))


def test_effects_are_mean_group_sums_and_terms_add_up():
    s = _scores(2)
    groups = np.where(np.arange(300) < 40, "planted", np.arange(300) % 3).astype(str)
    # Make the planted group clearly harmful to every test point.
    for name in ("total", "pretrained_term"):
        s[name][:, :40] -= 0.5
    rows = np.arange(0, 50, 2)
    frame = group_effects(s, groups, rows, n_boot=400, seed=0)
    planted = frame.set_index("group").loc["planted"]
    assert frame["group"].iloc[0] == "planted"     # most harmful first
    assert planted["total"] == pytest.approx(s["total"][rows][:, :40].sum(axis=1).mean())
    assert planted["total"] == pytest.approx(planted["pretrained_term"]
                                             + planted["finetuned_term"])
    assert planted["total_low"] <= planted["total"] <= planted["total_high"] < 0
    assert planted["significant"] and planted["share_harmed"] == 1.0
    assert frame["n_examples"].sum() == 300


def test_bootstrap_interval_matches_a_plain_loop_and_covers_the_mean():
    x = np.random.default_rng(3).normal(loc=1.0, size=(80, 2))
    low, high = bootstrap_interval(x, n_boot=500, seed=5)
    rng = np.random.default_rng(5)
    draws = rng.integers(0, 80, size=(500, 80))
    means = np.stack([x[d].mean(axis=0) for d in draws])
    np.testing.assert_allclose(low, np.quantile(means, 0.025, axis=0))
    np.testing.assert_allclose(high, np.quantile(means, 0.975, axis=0))
    # Width ~ 2 * 1.96 * sd / sqrt(n) for a normal sample.
    width = high - low
    np.testing.assert_allclose(width, 2 * 1.96 * x.std(axis=0) / np.sqrt(80), rtol=0.25)
