"""Plotly figures of the run comparison page (no Streamlit here): predicted vs actual change
of each test point with the y = x line, and the two confusion matrices side by side."""

from __future__ import annotations

from html import escape

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard.convention import HARMFUL_COLOR, HELPFUL_COLOR

#: Status -> (legend name, colour). Fixed points in the helpful colour, newly broken ones in the
#: harmful colour: the same meaning as the score signs everywhere else.
STATUS_STYLE = {
    "unchanged": ("unchanged", "#9a9a9a"),
    "fixed": ("fixed (misclassified → correct)", HELPFUL_COLOR),
    "broken": ("newly broken (correct → misclassified)", HARMFUL_COLOR),
}
#: Above this many points the scatter uses WebGL (SVG is sharper but slow for many points).
_SVG_MAX = 3000
_MARGIN = dict(l=10, r=10, t=40, b=10)


def _axis_range(values: np.ndarray) -> list[float]:
    """One range for both axes: the finite values with a 5% pad (a unit box when empty)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return [-1.0, 1.0]
    lo, hi = float(finite.min()), float(finite.max())
    pad = 0.05 * (hi - lo) or max(abs(hi), 1e-6) * 0.1
    return [lo - pad, hi + pad]


def prediction_scatter(points: pd.DataFrame, before_name: str, highlight: str | None = None
                       ) -> go.Figure:
    """Predicted change (x, first order from ``before_name``'s scores) vs actual change (y,
    after retraining) per test point, coloured by status, with the y = x line; both axes
    share one range so the diagonal is at 45 degrees.  Every point carries its test id as
    ``customdata``; ``highlight`` (a test id) is drawn as a star."""
    x_all = points["predicted_change"].to_numpy(dtype=float)
    y_all = points["actual_change"].to_numpy(dtype=float)
    bounds = _axis_range(np.concatenate([x_all, y_all]))
    scatter = go.Scatter if len(points) <= _SVG_MAX else go.Scattergl
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=bounds, y=bounds, mode="lines", name="y = x (perfect prediction)",
                             hoverinfo="skip", line=dict(color="#444", dash="dash", width=1)))
    for status, (name, color) in STATUS_STYLE.items():
        part = points[points["status"] == status]
        if part.empty:
            continue
        hover = [f"{escape(str(t))}<br>predicted {p:.3g} · actual {a:.3g}<br>"
                 f"loss {lb:.3g} → {la:.3g}"
                 for t, p, a, lb, la in zip(part["test_id"], part["predicted_change"],
                                            part["actual_change"], part["loss_before"],
                                            part["loss_after"], strict=True)]
        fig.add_trace(scatter(
            x=part["predicted_change"], y=part["actual_change"], mode="markers", name=name,
            customdata=part["test_id"].astype(str).to_numpy(), hovertext=hover,
            hoverinfo="text",
            marker=dict(color=color, size=6 if status == "unchanged" else 9,
                        opacity=0.55 if status == "unchanged" else 0.9,
                        line=dict(width=0.5, color="#333"))))
    if highlight is not None:
        row = points[points["test_id"].astype(str) == str(highlight)]
        if not row.empty:
            fig.add_trace(go.Scatter(
                x=row["predicted_change"], y=row["actual_change"], mode="markers",
                name=f"this point ({escape(str(highlight))})", hoverinfo="name",
                marker=dict(symbol="star", size=18, color="#111",
                            line=dict(width=1.5, color="#ffd700"))))
    fig.update_layout(
        title=dict(text=f"Predicted (first order, from {escape(before_name)}'s scores) vs actual "
                        "(retrained) change of the measurement", font=dict(size=13)),
        # constrain="domain": the equal aspect ratio shrinks the plot, not widens the range.
        xaxis=dict(title="predicted change", range=bounds, zeroline=True, constrain="domain"),
        yaxis=dict(title="actual change", range=bounds, zeroline=True,
                   scaleanchor="x", scaleratio=1),
        height=520, margin=_MARGIN, legend=dict(orientation="h", y=-0.15), dragmode="zoom")
    return fig


def confusion_pair(before: pd.DataFrame, after: pd.DataFrame, before_name: str,
                   after_name: str) -> go.Figure:
    """The two confusion matrices (rows: true class, columns: predicted class) side by side,
    on one colour scale so equal counts look equal."""
    # Plotly renders a subset of HTML in texts: names from the runs directory are escaped.
    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"before: {escape(before_name)}",
                                                        f"after: {escape(after_name)}"],
                        horizontal_spacing=0.12)
    top = max(int(before.to_numpy().max(initial=0)), int(after.to_numpy().max(initial=0)), 1)
    for col, matrix in ((1, before), (2, after)):
        fig.add_trace(go.Heatmap(
            z=matrix.to_numpy(), x=[str(c) for c in matrix.columns],
            y=[str(i) for i in matrix.index], zmin=0, zmax=top, colorscale="Greys",
            showscale=False, text=matrix.to_numpy(), texttemplate="%{text}",
            hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="predicted", type="category", row=1, col=col)
        fig.update_yaxes(title_text="true", type="category", autorange="reversed", row=1,
                         col=col)
    fig.update_layout(height=max(280, 40 * len(before) + 160), margin=_MARGIN)
    return fig

