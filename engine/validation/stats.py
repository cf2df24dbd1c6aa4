"""Agreement statistics of predicted vs actual changes, and JSON-safe formatting."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


# ----- statistics ---------------------------------------------------------------------------
def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _slope(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Least-squares slope of actual on predicted through the origin (magnitude ratio)."""
    den = float(np.sum(predicted * predicted))
    return float(np.sum(predicted * actual) / den) if den > 0 else float("nan")


def _agreement(predicted: np.ndarray, actual: np.ndarray) -> dict[str, Any]:
    return {"n_pairs": int(len(predicted)), "pearson": _pearson(predicted, actual),
            "spearman": _spearman(predicted, actual),
            "sign_agreement": float(np.mean(np.sign(predicted) == np.sign(actual)))
            if len(predicted) else float("nan"),
            "slope_actual_on_predicted": _slope(predicted, actual)}


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_clean(v) for v in obj.tolist()]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)
