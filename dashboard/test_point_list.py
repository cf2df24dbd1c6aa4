"""Which test points to browse and in what order (no Streamlit here)."""

from __future__ import annotations

from collections.abc import Collection

import pandas as pd

SUBSETS = ("all", "correct", "misclassified")
SORT_KEYS = ("loss", "confidence")


def list_test_points(test_points: pd.DataFrame, subset: str = "all",
                     true_labels: Collection[int] = (), pred_labels: Collection[int] = (),
                     sort_by: str = "loss", descending: bool = True,
                     misclassified_first: bool = True) -> pd.DataFrame:
    """Test points of ``subset`` with the given true / predicted labels, ordered for browsing.

    Default order: misclassified points first, then by ``sort_by`` (highest first).  The result
    keeps a ``row`` column: the position of the point in the score matrices.
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}")
    if sort_by not in SORT_KEYS:
        raise ValueError(f"sort_by must be one of {SORT_KEYS}")
    frame = test_points.assign(row=range(len(test_points)))
    if sort_by == "confidence" and "confidence" not in frame.columns:
        prob_cols = [c for c in frame.columns if c.startswith("prob_")]
        frame = frame.assign(confidence=frame[prob_cols].max(axis=1) if prob_cols else 0.0)
    correct = frame["correct"].astype(bool)
    if subset == "correct":
        frame = frame[correct]
    elif subset == "misclassified":
        frame = frame[~correct]
    if true_labels:
        frame = frame[frame["label"].isin(list(true_labels))]
    if pred_labels:
        frame = frame[frame["pred"].isin(list(pred_labels))]
    keys, ascending = [sort_by], [not descending]
    if misclassified_first:
        frame = frame.assign(_correct=frame["correct"].astype(bool))
        keys, ascending = ["_correct", sort_by], [True, not descending]
    frame = frame.sort_values(keys, ascending=ascending, kind="stable")
    return frame.drop(columns=["_correct"], errors="ignore")
