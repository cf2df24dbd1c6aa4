"""Group-level influence on the Overview: cached :func:`engine.group_influence.group_effects`
per (run, column, test subset) and its bar chart with bootstrap intervals."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard.convention import sign_color
from dashboard.run_details import class_names, label_name, misclassified_rows
from engine.artifacts import Run
from engine.group_influence import group_effects

N_BOOT = 1000
BOOT_LEVEL = 0.95


@st.cache_resource(max_entries=16, show_spinner="Aggregating influence by group…")
def group_effects_cached(run_id: str, column: str, subset: str, _run: Run) -> pd.DataFrame:
    """Group effects of ``column`` over all (``subset="all"``) or the misclassified test
    points, cached per run id (never keyed by array contents; do not mutate)."""
    rows = np.arange(_run.n_test) if subset == "all" else misclassified_rows(_run)
    values = _run.pretrain_examples[column].to_numpy()
    frame = group_effects(_run.scores, values, rows, n_boot=N_BOOT, level=BOOT_LEVEL, seed=0)
    if column == "label":
        names = class_names(_run, "pretrain")
        frame["group"] = [label_name(names, int(v)) for v in frame["group"]]
    return frame


def group_effect_bars(by_set: Mapping[str, pd.DataFrame]) -> go.Figure:
    """One panel per test set: the predicted effect of removing each group (bars in sign
    colours) with its bootstrap interval as an error bar."""
    fig = make_subplots(rows=1, cols=len(by_set), subplot_titles=list(by_set),
                        horizontal_spacing=0.12)
    for i, frame in enumerate(by_set.values(), start=1):
        fig.add_trace(go.Bar(
            x=frame["total"], y=frame["group"].astype(str), orientation="h", showlegend=False,
            marker_color=[sign_color(v) for v in frame["total"]],
            error_x=dict(type="data", symmetric=False,
                         array=(frame["total_high"] - frame["total"]).to_numpy(),
                         arrayminus=(frame["total"] - frame["total_low"]).to_numpy(),
                         color="#444", thickness=1.2),
            customdata=np.stack([frame["n_examples"], frame["total_low"], frame["total_high"]],
                                axis=1),
            hovertemplate="%{y}: %{x:.3g} [%{customdata[1]:.3g}, %{customdata[2]:.3g}]<br>"
                          "%{customdata[0]} examples<extra></extra>"), row=1, col=i)
        fig.add_vline(x=0, line=dict(color="#555", width=1), row=1, col=i)
        fig.update_yaxes(type="category", autorange="reversed", row=1, col=i)
    n = max((len(f) for f in by_set.values()), default=1)
    fig.update_layout(height=max(260, 26 * n + 100), margin=dict(l=10, r=10, t=30, b=10))
    fig.update_xaxes(title_text="predicted change of the mean test loss if removed")
    return fig
