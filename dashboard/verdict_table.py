"""Overview section "pretraining or finetuning data?": the stage verdict
(:mod:`engine.stage_verdict`) of every misclassified test point, counted and listed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard.example_display import test_links
from engine.artifacts import Run
from engine.stage_verdict import DEFAULT_K, stage_verdict

#: Misclassified points read for the table (one pretraining score row each).
MAX_POINTS = 2000


@st.cache_data(max_entries=8, show_spinner=False)
def _verdicts(run_id: str, k: int, _run: Run) -> pd.DataFrame:
    tp = _run.test_points
    rows = np.flatnonzero(~tp["correct"].to_numpy(dtype=bool))[:MAX_POINTS]
    out = []
    for r in rows:
        v = stage_verdict(np.asarray(_run.scores["total"][int(r)], dtype=np.float64),
                          np.asarray(_run.finetune_scores[int(r)], dtype=np.float64), k)
        out.append((str(tp["test_id"].iloc[r]), float(tp["loss"].iloc[r]), v.pretrain_fix,
                    v.finetune_fix, v.pretrain_share, v.stage))
    return pd.DataFrame(out, columns=["test_id", "loss", "pretraining_fix", "finetuning_fix",
                                      "pretraining_share", "stage"])


def verdict_section(run: Run, k: int = DEFAULT_K) -> None:
    """Counts of misclassified points by stage and the per-point table (links to each)."""
    st.subheader("Pretraining or finetuning data? (misclassified test points)")
    if run.finetune_scores is None:
        st.caption("This run has no finetuning-data influence (`[influence] finetune_influence "
                   "= false`), so it cannot say whether an error comes from the finetuning "
                   "data.")
        return
    table = _verdicts(run.run_id, k, run)
    if table.empty:
        st.caption("No misclassified test points.")
        return
    counts = table["stage"].value_counts()
    cols = st.columns(4)
    for col, stage in zip(cols, ("pretraining", "finetuning", "both", "neither"), strict=True):
        col.metric(f"mostly {stage}" if stage in ("pretraining", "finetuning") else stage,
                   int(counts.get(stage, 0)))
    st.caption(f"Per misclassified point: the first-order change of its loss from removing its "
               f"{k} most harmful pretraining examples (both stages retrained) vs its {k} most "
               "harmful finetuning examples (finetuning retrained); *mostly* = at least 2/3 of "
               "the sum of both." + (f" First {MAX_POINTS} misclassified points."
                                     if len(table) == MAX_POINTS else ""))
    view = table.assign(test_id=test_links(table["test_id"].tolist(), run.path.name))
    st.dataframe(view.sort_values("loss", ascending=False), hide_index=True, key="verdict_table",
                 column_config={
                     "test_id": st.column_config.LinkColumn("test point",
                                                            display_text=r"test_id=(.*)$"),
                     "loss": st.column_config.NumberColumn(format="%.3f"),
                     "pretraining_fix": st.column_config.NumberColumn(format="%+.3f"),
                     "finetuning_fix": st.column_config.NumberColumn(format="%+.3f"),
                     "pretraining_share": st.column_config.NumberColumn(format="%.2f")})
