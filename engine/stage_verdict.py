"""Which stage's data a test point's error comes from: pretraining vs finetuning examples.

For a test point the run holds two score rows with the same sign convention (the predicted
change of its test loss if one example is removed): the multi-stage scores of the pretraining
examples (``scores/total.npy``, both stages retrained) and the single-stage scores of the
finetuning examples (``finetune_scores.npy``, finetuning stage retrained).  Removing a set
predicts, to first order, the sum of its scores; the most a set of ``k`` examples can lower the
loss (to first order) is the sum of the ``k`` most negative scores.  The verdict compares that
*predicted fix* for the ``k`` most harmful pretraining examples with the one for the ``k`` most
harmful finetuning examples: equal budgets, so the answer says where removing a few examples
helps more, not which pool is larger.

It is a first-order statement about removals, not a decomposition of the error: both fixes are
linear extrapolations (the finetuning-only retrains of ``engine validate`` under-predict the
largest finetuning effects by 1.4-1.8x on the digits sample, see README "Validation").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Default number of examples removed from each stage's pool.
DEFAULT_K = 10
#: Below this share neither stage dominates ("both").
DOMINANT_SHARE = 2 / 3


def predicted_fix(row: np.ndarray, k: int) -> float:
    """Sum of the ``k`` most negative scores of ``row`` (0 when none is negative): the
    first-order change of the test loss from removing its ``k`` most harmful examples."""
    row = np.asarray(row, dtype=np.float64)
    k = min(int(k), len(row))
    if k <= 0:
        return 0.0
    worst = np.partition(row, k - 1)[:k]
    return float(worst[worst < 0].sum())


def dominant_stage(pretrain_fix: float, finetune_fix: float,
                   share: float = DOMINANT_SHARE) -> str:
    """``"pretraining"``, ``"finetuning"``, ``"both"`` or ``"neither"`` (no harmful example in
    either pool), from the two (non-positive) predicted fixes."""
    total = pretrain_fix + finetune_fix
    if total >= 0:
        return "neither"
    p = pretrain_fix / total
    return "pretraining" if p >= share else "finetuning" if p <= 1 - share else "both"


@dataclass(frozen=True)
class StageVerdict:
    """The verdict of one test point (fixes are <= 0: predicted changes of the test loss)."""

    k: int
    pretrain_fix: float
    finetune_fix: float
    stage: str

    @property
    def pretrain_share(self) -> float:
        """Share of the pretraining fix in the sum of both fixes (NaN when both are 0)."""
        total = self.pretrain_fix + self.finetune_fix
        return self.pretrain_fix / total if total < 0 else float("nan")

    def sentence(self, measure: str = "loss") -> str:
        """One line for the UI and reports."""
        k = self.k
        head = (f"Removing its {k} most harmful pretraining examples is predicted to change "
                f"its {measure} by {self.pretrain_fix:+.3g}, its {k} most harmful finetuning "
                f"examples by {self.finetune_fix:+.3g}")
        if self.stage == "neither":
            return head + ": no example of either stage is harmful to it."
        if self.stage == "both":
            return head + f": both stages contribute ({self.pretrain_share:.0%} pretraining)."
        share = self.pretrain_share if self.stage == "pretraining" else 1 - self.pretrain_share
        return head + f": mostly the {self.stage} data ({share:.0%} of the predicted fix)."


def stage_verdict(pretrain_row: np.ndarray, finetune_row: np.ndarray,
                  k: int = DEFAULT_K) -> StageVerdict:
    """The verdict of one test point from its two score rows."""
    p, f = predicted_fix(pretrain_row, k), predicted_fix(finetune_row, k)
    return StageVerdict(int(k), p, f, dominant_stage(p, f))


def stage_verdicts(total: np.ndarray, finetune_scores: np.ndarray, rows: np.ndarray,
                   k: int = DEFAULT_K) -> pd.DataFrame:
    """Verdicts of the test points at score rows ``rows``: one row each with ``row``,
    ``pretrain_fix``, ``finetune_fix``, ``pretrain_share`` and ``stage``."""
    out = [stage_verdict(total[int(r)], finetune_scores[int(r)], k) for r in rows]
    return pd.DataFrame({
        "row": np.asarray(rows, dtype=np.int64),
        "pretrain_fix": [v.pretrain_fix for v in out],
        "finetune_fix": [v.finetune_fix for v in out],
        "pretrain_share": [v.pretrain_share for v in out],
        "stage": [v.stage for v in out],
    })
