"""Influence of whole groups of pretraining examples (a label, a ``source`` column, any column),
with a bootstrap confidence interval over test points.

For a group ``g`` and a set of test points ``T``, the predicted effect of removing the group is
the first-order change of the mean test measurement over ``T``:

    effect(g) = (1/|T|) sum_{t in T} sum_{j in g} score[t, j]

(sums of scores, by the score convention: > 0 means the group helps these test points, < 0 that
removing it is predicted to lower their mean loss).  Its uncertainty over the choice of test
points is a percentile bootstrap: resample ``T`` with replacement ``n_boot`` times and take the
2.5% / 97.5% quantiles of the resampled means.  The group sums per test point are computed once
in one pass over the score matrix (row blocks, bounded memory); the bootstrap then only touches
the small ``|T| x n_groups`` matrix, so it costs nothing next to reading the scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

SCORE_NAMES = ("total", "pretrained_term", "finetuned_term")
_ROW_BLOCK = 64


def group_sums(matrix: np.ndarray, codes: np.ndarray, n_groups: int,
               rows: np.ndarray) -> np.ndarray:
    """``out[i, g] = sum_{j : codes[j] == g} matrix[rows[i], j]`` (float64), reading ``matrix``
    in blocks of rows (works for arrays, memory maps and row-readable score matrices)."""
    rows = np.asarray(rows, dtype=np.int64)
    onehot = np.zeros((len(codes), n_groups), dtype=np.float64)
    onehot[np.arange(len(codes)), codes] = 1.0
    out = np.empty((len(rows), n_groups), dtype=np.float64)
    for start in range(0, len(rows), _ROW_BLOCK):
        idx = rows[start:start + _ROW_BLOCK]
        out[start:start + len(idx)] = np.asarray(matrix[idx], dtype=np.float64) @ onehot
    return out


def bootstrap_interval(per_point: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap of the column means of ``per_point`` (test points x groups) over
    its rows; returns ``(low, high)`` per column.  A single row gives a zero-width interval."""
    n = per_point.shape[0]
    if n <= 1:
        mean = per_point.mean(axis=0) if n else np.zeros(per_point.shape[1])
        return mean, mean
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    # Each draw's mean as counts @ per_point / n: one matrix product instead of n_boot slices.
    counts = np.zeros((n_boot, n), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(n_boot), n), draws.ravel()), 1.0)
    means = counts @ per_point / n
    alpha = (1.0 - level) / 2
    return np.quantile(means, alpha, axis=0), np.quantile(means, 1 - alpha, axis=0)


def group_effects(scores: Mapping[str, np.ndarray], groups: Sequence[object],
                  test_rows: Sequence[int], n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0) -> pd.DataFrame:
    """Per group: size, predicted effect of removing it on the mean measurement of
    ``test_rows`` (``total`` and its two terms), the bootstrap interval of ``total``
    (``total_low`` / ``total_high``), the share of those test points it harms (group sum < 0),
    sorted most harmful first.  ``groups`` holds one value per pretraining example."""
    keys = pd.Series(list(groups), dtype=object).astype(str)
    codes, names = pd.factorize(keys, sort=True)
    rows = np.asarray(test_rows, dtype=np.int64)
    sums = {name: group_sums(scores[name], codes, len(names), rows) for name in SCORE_NAMES}
    low, high = bootstrap_interval(sums["total"], n_boot=n_boot, level=level, seed=seed)
    n = max(len(rows), 1)
    frame = pd.DataFrame({
        "group": list(names),
        "n_examples": np.bincount(codes, minlength=len(names)),
        "total": sums["total"].sum(axis=0) / n,
        "pretrained_term": sums["pretrained_term"].sum(axis=0) / n,
        "finetuned_term": sums["finetuned_term"].sum(axis=0) / n,
        "total_low": low, "total_high": high,
        "share_harmed": (sums["total"] < 0).mean(axis=0) if len(rows) else 0.0,
    })
    frame["per_example"] = frame["total"] / frame["n_examples"]
    # An interval that excludes zero: the sign of the effect does not depend on which test
    # points happened to be in the set.
    frame["significant"] = (frame["total_high"] < 0) | (frame["total_low"] > 0)
    return frame.sort_values("total", kind="stable").reset_index(drop=True)
