"""What-if before retraining: the first-order prediction of removing a set of pretraining
examples, read from a run's scores (no training).

By the score convention a score is the predicted change of the test measurement if that one
example is removed, so removing a set S predicts, to first order, the sum of the set's scores:
``predicted_change[t] = sum_{j in S} total[t, j]`` (and the same split into the two terms).  It
is a linear extrapolation: it ignores interactions between the removed examples, so it is least
reliable for large sets (the run comparison page shows how it did after a retrain).

Whether a misclassified point would be fixed is decided from the predicted measurement against a
threshold that is *sufficient* for the prediction to be right or wrong (see
:func:`flip_thresholds`): exact for a margin and for two classes, conservative otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import pandas as pd

from engine.artifacts import Run

#: How the UI names these numbers (they are not a retrain).
FIRST_ORDER_LABEL = ("first-order prediction from this run's scores (sum of the removed "
                     "examples' scores; no retraining)")
OUTCOMES = ("predicted fix", "predicted break", "stays correct", "stays misclassified",
            "undetermined")


def removal_columns(run: Run, example_ids: Collection[str]) -> np.ndarray:
    """Column indices (rows of ``run.pretrain_examples``) of those ids that are pretraining
    examples of the run, in table order; other ids are ignored (count them with
    :func:`unknown_ids`)."""
    wanted = {str(e) for e in example_ids}
    ids = run.pretrain_examples["example_id"].astype(str).to_numpy()
    return np.flatnonzero(np.isin(ids, list(wanted))) if wanted else np.zeros(0, dtype=np.int64)


def unknown_ids(run: Run, example_ids: Collection[str]) -> list[str]:
    """The given ids that are not pretraining examples of the run (sorted)."""
    known = set(run.pretrain_examples["example_id"].astype(str))
    return sorted({str(e) for e in example_ids} - known)


#: Up to this many columns are read one column at a time (one read per element: cheap for a
#: few flagged examples); more are summed over blocks of whole rows, so memory stays bounded.
_COLUMN_READS = 64
_ROW_BLOCK = 64


def _column_sum(matrix: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Row sums of ``matrix[:, columns]`` without holding the whole matrix in memory (works for
    in-memory arrays, memory maps and the dashboard's :class:`~dashboard.run_reader.ScoreMatrix`,
    where a column read costs one small read per row)."""
    n_rows = matrix.shape[0]
    out = np.zeros(n_rows, dtype=np.float64)
    if len(columns) == 0:
        return out
    if len(columns) <= _COLUMN_READS:
        for j in columns:
            out += np.asarray(matrix[:, int(j)], dtype=np.float64)
        return out
    for start in range(0, n_rows, _ROW_BLOCK):
        block = np.asarray(matrix[start:start + _ROW_BLOCK])
        out[start:start + len(block)] = block[:, columns].sum(axis=1, dtype=np.float64)
    return out


def removal_prediction(run: Run, example_ids: Collection[str], score: str = "total"
                       ) -> np.ndarray:
    """Predicted change of every scored test point's measurement (one value per row of
    ``run.test_points``) if ``example_ids`` are removed: the sum of their ``score`` columns
    (``total``, ``pretrained_term`` or ``finetuned_term``)."""
    return _column_sum(run.scores[score], removal_columns(run, example_ids))


def finetune_columns(run: Run, example_ids: Collection[str]) -> np.ndarray:
    """Column indices of ``run.finetune_scores`` (rows of ``run.finetune_examples``) of those
    ids that are finetuning examples of the run; empty when the run has none."""
    wanted = {str(e) for e in example_ids}
    if run.finetune_examples is None or not wanted:
        return np.zeros(0, dtype=np.int64)
    ids = run.finetune_examples["example_id"].astype(str).to_numpy()
    return np.flatnonzero(np.isin(ids, list(wanted)))


def finetune_removal_prediction(run: Run, example_ids: Collection[str]) -> np.ndarray:
    """Predicted change of every scored test point's measurement if the finetuning examples
    ``example_ids`` are removed (finetuning stage retrained): the sum of their columns of
    ``run.finetune_scores`` (zeros when the run has no finetuning-data influence)."""
    if run.finetune_scores is None:
        return np.zeros(run.n_test, dtype=np.float64)
    return _column_sum(run.finetune_scores, finetune_columns(run, example_ids))


def point_prediction(run: Run, example_ids: Collection[str], test_row: int) -> dict[str, float]:
    """The what-if of one test point (a row of ``run.test_points``): ``measurement``,
    ``predicted_change`` (and per term) and ``predicted_after``.  Reads only that row of each
    score matrix, so it is cheap enough to run on every flag edit."""
    columns = removal_columns(run, example_ids)
    tp = run.test_points
    column = "measurement" if "measurement" in tp else "loss"
    out = {"measurement": float(tp[column].iloc[test_row])}
    for name, key in (("total", "predicted_change"), ("pretrained_term", "pretrained_term"),
                      ("finetuned_term", "finetuned_term")):
        row = np.asarray(run.scores[name][test_row], dtype=np.float64)
        out[key] = float(row[columns].sum()) if len(columns) else 0.0
    out["predicted_after"] = out["measurement"] + out["predicted_change"]
    out["n_removed"] = float(len(columns))
    return out


def point_outcome(run: Run, correct: bool, predicted_after: float) -> str:
    """One of :data:`OUTCOMES` for one point (see :func:`flip_thresholds`)."""
    lo, hi = flip_thresholds(run)
    return _outcome(bool(correct), float(predicted_after), lo, hi)


def flip_thresholds(run: Run) -> tuple[float, float]:
    """``(fixed_below, broken_above)``: a point is certainly classified correctly when its
    measurement is below the first, certainly misclassified when above the second.

    * ``margin`` (minus the true-class margin): 0 and 0, exact.
    * ``loss`` / ``log_prob`` (minus log p(true class), cross-entropy): p(true) > 1/2 makes the
      true class the argmax, so ``log 2``; p(true) < 1/K makes some other class larger, so
      ``log K``.  With two classes both are ``log 2`` and the rule is exact.
    """
    if str(run.manifest.get("measurement", "loss")) == "margin":
        return 0.0, 0.0
    k = max(len((run.manifest.get("classes") or {}).get("finetune") or []), 2)
    return math.log(2.0), math.log(k)


def _outcome(correct: bool, after: float, fixed_below: float, broken_above: float) -> str:
    if correct:
        if after > broken_above:
            return "predicted break"
        return "stays correct" if after < fixed_below else "undetermined"
    if after < fixed_below:
        return "predicted fix"
    return "stays misclassified" if after > broken_above else "undetermined"


@dataclass(frozen=True)
class WhatIf:
    """The first-order prediction of removing a set of pretraining examples."""

    frame: pd.DataFrame   # one row per scored test point (columns: see :func:`what_if`)
    n_removed: int        # ids that are pretraining examples of the run
    n_unknown: int        # ids that are not (e.g. flags of examples no longer in the data)
    thresholds: tuple[float, float]

    @property
    def fixes(self) -> list[str]:
        """Test ids of misclassified points predicted to become correct."""
        return self.frame.loc[self.frame["outcome"] == "predicted fix", "test_id"].tolist()

    @property
    def breaks(self) -> list[str]:
        """Test ids of correct points predicted to become misclassified."""
        return self.frame.loc[self.frame["outcome"] == "predicted break", "test_id"].tolist()

    def row(self, test_id: str) -> pd.Series | None:
        """The prediction for one test point, or ``None`` when it is not scored in the run."""
        hit = self.frame[self.frame["test_id"] == str(test_id)]
        return None if hit.empty else hit.iloc[0]


def what_if(run: Run, example_ids: Collection[str]) -> WhatIf:
    """Predicted effect on every scored test point of removing ``example_ids``.

    ``frame`` columns: ``test_id``, ``correct``, ``measurement`` (now), ``predicted_change``
    (sum of the total scores), ``pretrained_term`` and ``finetuned_term`` (the same sum per
    term), ``predicted_after`` (= measurement + predicted_change) and ``outcome`` (one of
    :data:`OUTCOMES`).
    """
    columns = removal_columns(run, example_ids)
    tp = run.test_points
    measurement = tp["measurement"].to_numpy(dtype=np.float64) if "measurement" in tp \
        else tp["loss"].to_numpy(dtype=np.float64)
    change = _column_sum(run.scores["total"], columns)
    frame = pd.DataFrame({
        "test_id": tp["test_id"].astype(str).to_numpy(),
        "correct": tp["correct"].astype(bool).to_numpy(),
        "measurement": measurement,
        "predicted_change": change,
        "pretrained_term": _column_sum(run.scores["pretrained_term"], columns),
        "finetuned_term": _column_sum(run.scores["finetuned_term"], columns),
        "predicted_after": measurement + change,
    })
    lo, hi = flip_thresholds(run)
    frame["outcome"] = [_outcome(c, a, lo, hi) for c, a in
                        zip(frame["correct"], frame["predicted_after"], strict=True)]
    return WhatIf(frame=frame, n_removed=len(columns),
                  n_unknown=len(unknown_ids(run, example_ids)), thresholds=(lo, hi))
