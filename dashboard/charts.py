"""Plotly figures of the dashboard (no Streamlit here), all in the sign colours of
:mod:`dashboard.convention`: helpful (score > 0) and harmful (score < 0) never swap colours."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard.convention import (
    HARMFUL_COLOR,
    HELPFUL_COLOR,
    sign_color,
)
from dashboard.map_chart import hover_data
from dashboard.map_chart import influence_map as influence_map  # re-exported (moved there)

_MARGIN = dict(l=10, r=10, t=40, b=10)

_HOVER = ("%{customdata[0]} · label %{customdata[1]}<br>total %{customdata[2]}"
          "<br>pretrained %{x:.3g} · finetuned %{y:.3g}<extra></extra>")


def _line(axis: str, at: float = 0.0, color: str = "#999", dash: str | None = None) -> dict:
    """A full-height (``axis="x"``) or full-width (``"y"``) line as a layout shape (cheaper
    than ``add_vline`` / ``add_hline``)."""
    line = dict(color=color, width=1, **({"dash": dash} if dash else {}))
    if axis == "x":
        return dict(type="line", xref="x", yref="paper", x0=at, x1=at, y0=0, y1=1, line=line)
    return dict(type="line", xref="paper", yref="y", x0=0, x1=1, y0=at, y1=at, line=line)


def term_scatter(frame: pd.DataFrame) -> go.Figure:
    """Pretrained-model term (x) vs finetuned-model term (y), one colour per sign of total,
    with quadrant lines and the ``total = 0`` diagonal."""
    traces = []
    total = frame["total"].to_numpy()
    for name, mask, color in (("helpful (total > 0)", total > 0, HELPFUL_COLOR),
                              ("harmful (total < 0)", total < 0, HARMFUL_COLOR)):
        part = frame[mask]
        traces.append(go.Scatter(
            x=part["pretrained_term"].to_numpy(), y=part["finetuned_term"].to_numpy(),
            mode="markers", name=name, customdata=hover_data(part), hovertemplate=_HOVER,
            marker=dict(color=color, size=5, opacity=0.7)))
    lim = float(np.abs(frame[["pretrained_term", "finetuned_term"]].to_numpy()).max()) \
        if len(frame) else 1.0
    traces.append(go.Scatter(x=[-lim, lim], y=[lim, -lim], mode="lines", name="total = 0",
                             hoverinfo="skip", line=dict(color="#bbb", dash="dot")))
    return go.Figure(data=traces, layout=dict(
        title=dict(text="Pretrained term vs finetuned term", font=dict(size=13)),
        xaxis=dict(title=dict(text="pretrained_term")),
        yaxis=dict(title=dict(text="finetuned_term")), height=360, margin=_MARGIN,
        legend=dict(orientation="h", y=-0.25), shapes=[_line("x"), _line("y")]))


def score_histogram(values: np.ndarray, bins: int = 60, title: str = "Histogram of total scores",
                    counted: str = "examples") -> go.Figure:
    """Histogram computed here (only bin counts go to the browser), bars in sign colours."""
    values = np.asarray(values, dtype=float)
    traces = []
    if len(values):
        counts, edges = np.histogram(values, bins=bins)
        centers = (edges[:-1] + edges[1:]) / 2
        traces.append(go.Bar(x=centers, y=counts, width=np.diff(edges),
                             marker_color=[sign_color(c) for c in centers],
                             hovertemplate=f"score %{{x:.3g}}<br>%{{y}} {counted}<extra></extra>",
                             showlegend=False))
    return go.Figure(data=traces, layout=dict(
        title=dict(text=title, font=dict(size=13)), xaxis=dict(title=dict(text="total score")),
        yaxis=dict(title=dict(text=counted)), bargap=0, height=360, margin=_MARGIN,
        shapes=[_line("x", color="#555", dash="dot")]))


def split_title(n_helpful: int, n_harmful: int, harmful_first: bool = False) -> str:
    """Title of :func:`term_split_bars`: says exactly which rows it draws."""
    pairs = ((n_helpful, "helpful"), (n_harmful, "harmful"))
    parts = [f"{n} most {word}" for n, word in (pairs[::-1] if harmful_first else pairs) if n]
    rows = " and ".join(parts) if parts else "no"
    return (f"Term split of the {rows} examples in the tables ({n_helpful + n_harmful} bars)"
            "<br><sup>pretrained_term (solid) + finetuned_term (hatched) = total (◆)</sup>")


def term_split_bars(helpful: pd.DataFrame, harmful: pd.DataFrame, per_sign: int = 25,
                    harmful_first: bool = False) -> go.Figure:
    """Per example: the pretrained term (solid) and the finetuned term (hatched) stacked on a
    diverging axis, each segment in its sign colour; a black diamond marks the total.

    Draws the first ``per_sign`` rows of ``helpful`` (most helpful first) and of ``harmful``
    (most harmful first), every one of them labelled, and says how many in the title; the
    harmful rows are drawn on top when ``harmful_first`` (as the tables order them).
    """
    helpful, harmful = helpful.head(per_sign), harmful.head(per_sign)
    first, second = (harmful, helpful) if harmful_first else (helpful, harmful)
    part = pd.concat([first, second]).iloc[::-1]  # plotly draws the first category lowest
    y = [f"{e} ({lab})" for e, lab in zip(part["example_id"], part["label_name"], strict=True)]
    traces: list = []
    for col, pattern in (("pretrained_term", ""), ("finetuned_term", "/")):
        vals = part[col].to_numpy(dtype=float)
        traces.append(go.Bar(
            y=y, x=vals, orientation="h", name=col, showlegend=False,
            marker=dict(color=[sign_color(v) for v in vals],
                        pattern=dict(shape=pattern, fgcolor="#fff", size=5),
                        line=dict(color="#333", width=0.5)),
            hovertemplate=f"%{{y}}<br>{col} %{{x:.3g}}<extra></extra>"))
    # Legend entries in neutral grey (the bar colours encode the sign): markers of traces
    # without points, so they add no category (and no bar) to the chart.
    for symbol, name in (("square", "pretrained_term (solid)"),
                         ("square-open", "finetuned_term (hatched)")):
        traces.append(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                 hoverinfo="skip", marker=dict(symbol=symbol, color="#777",
                                                               size=12)))
    traces.append(go.Scatter(y=y, x=part["total"].to_numpy(), mode="markers", name="total",
                             marker=dict(symbol="diamond", color="#111", size=8),
                             hovertemplate="%{y}<br>total %{x:.3g}<extra></extra>"))
    height = max(280, 22 * len(part) + 140)
    return go.Figure(data=traces, layout=dict(
        barmode="relative", height=height,
        shapes=[_line("x", color="#555")],
        title=dict(text=split_title(len(helpful), len(harmful), harmful_first),
                   font=dict(size=13)),
        yaxis=dict(type="category", categoryorder="array", categoryarray=y, dtick=1,
                   automargin=True),
        xaxis=dict(title=dict(text="score")), margin=dict(l=10, r=10, t=60, b=10),
        # Below the axis title whatever the height (paper units shrink as the chart grows).
        legend=dict(orientation="h", yanchor="top", y=-70 / (height - 70))))


def group_influence_bars(by_set: Mapping[str, pd.DataFrame], key: str) -> go.Figure:
    """One panel per test set (e.g. all / misclassified): summed total score per group,
    bars in sign colours."""
    fig = make_subplots(rows=1, cols=len(by_set), subplot_titles=list(by_set),
                        horizontal_spacing=0.12)
    for i, agg in enumerate(by_set.values(), start=1):
        labels = agg[key].astype(str)
        fig.add_trace(go.Bar(
            x=agg["total"], y=labels, orientation="h", showlegend=False,
            marker_color=[sign_color(v) for v in agg["total"]],
            customdata=np.stack([agg["n_examples"], agg["total_per_example"]], axis=1),
            hovertemplate="%{y}: %{x:.3g}<br>%{customdata[0]} examples, "
                          "%{customdata[1]:.3g} per example<extra></extra>"), row=1, col=i)
        fig.add_vline(x=0, line=dict(color="#555", width=1), row=1, col=i)
        fig.update_yaxes(type="category", row=1, col=i)
    fig.update_layout(height=max(260, 26 * max(len(a) for a in by_set.values()) + 100),
                      margin=dict(l=10, r=10, t=30, b=10))
    fig.update_xaxes(title_text="summed total score")
    return fig


def confusion_heatmap(matrix: pd.DataFrame) -> go.Figure:
    """Confusion matrix (rows: true class, columns: predicted class) with counts."""
    fig = go.Figure(go.Heatmap(
        z=matrix.to_numpy(), x=[str(c) for c in matrix.columns], y=[str(i) for i in matrix.index],
        colorscale="Greys", showscale=False, text=matrix.to_numpy(), texttemplate="%{text}",
        hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"))
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10),
                      xaxis=dict(title="predicted", type="category"),
                      yaxis=dict(title="true", type="category", autorange="reversed"),
                      title=dict(text="Confusion matrix", font=dict(size=13)))
    return fig


def selected_example_ids(event: Any) -> tuple[str, ...] | None:
    """Example ids of the points selected in a chart event, or ``None`` without a selection.

    Accepts the ``PlotlyState`` returned by ``st.plotly_chart(on_select=...)`` and the plain
    dict AppTest seeds.  ``customdata`` arrives as ``{'0': v}`` (Plotly Express), a list, or a
    scalar (1-D ``go.Scatter``); points without customdata (the test point star) are skipped.
    """
    if not event:
        return None
    try:
        selection = event["selection"]
        points = selection["points"]
    except (KeyError, TypeError):
        return None
    boxes = selection.get("box") if hasattr(selection, "get") else None
    lassos = selection.get("lasso") if hasattr(selection, "get") else None
    if not points and not boxes and not lassos:
        return None
    ids: list[str] = []
    for point in points:
        data = point.get("customdata") if hasattr(point, "get") else None
        if isinstance(data, Mapping):
            data = data.get("0", next(iter(data.values()), None))
        elif isinstance(data, (list, tuple)):
            data = data[0] if data else None
        if data is not None:
            ids.append(str(data))
    return tuple(dict.fromkeys(ids))
