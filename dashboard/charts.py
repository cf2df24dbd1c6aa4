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
    DIVERGING_SCALE,
    HARMFUL_COLOR,
    HELPFUL_COLOR,
    sign_color,
)

_MARGIN = dict(l=10, r=10, t=40, b=10)


def _hover(frame: pd.DataFrame) -> list[str]:
    return [f"{eid} · label {lab}<br>total {t:.3g}<br>pretrained {p:.3g} · finetuned {f:.3g}"
            for eid, lab, t, p, f in zip(frame["example_id"], frame["label_name"],
                                         frame["total"], frame["pretrained_term"],
                                         frame["finetuned_term"], strict=True)]


def influence_map(sample: pd.DataFrame, xy: np.ndarray, test_xy: tuple[float, float] | None,
                  test_id: str) -> go.Figure:
    """2-D map of pretraining examples (``sample`` rows, coordinates ``xy[sample.row]``)
    coloured by their total score on the test point, which is drawn as a star.

    Each point carries its ``example_id`` as ``customdata`` so a box/lasso selection maps back
    to ids (see :func:`selected_example_ids`).
    """
    rows = sample["row"].to_numpy()
    pts = np.asarray(xy[rows], dtype=float) if len(rows) else np.zeros((0, 2))
    total = sample["total"].to_numpy(dtype=float)
    # Robust colour range: a few extreme scores would otherwise wash out everything else.
    bound = float(np.quantile(np.abs(total), 0.98)) if len(total) else 0.0
    bound = bound or float(np.abs(total).max(initial=0.0)) or 1.0
    fig = go.Figure()
    fig.add_trace(go.Scattergl(
        x=pts[:, 0], y=pts[:, 1], mode="markers", name="pretraining examples",
        customdata=sample["example_id"].to_numpy(),
        hovertext=_hover(sample), hoverinfo="text",
        marker=dict(color=total, colorscale=DIVERGING_SCALE, cmid=0.0, cmin=-bound, cmax=bound,
                    size=6, line=dict(width=0.3, color="#888"),
                    colorbar=dict(title="total<br>score", thickness=12)),
    ))
    if test_xy is not None:
        fig.add_trace(go.Scatter(
            x=[test_xy[0]], y=[test_xy[1]], mode="markers", name=f"test point {test_id}",
            hoverinfo="name", marker=dict(symbol="star", size=18, color="#111",
                                          line=dict(width=1.5, color="#ffd700"))))
    fig.update_layout(
        dragmode="select", height=430, margin=dict(l=10, r=10, t=30, b=10), showlegend=True,
        legend=dict(orientation="h", y=-0.05), xaxis=dict(showticklabels=False),
        yaxis=dict(showticklabels=False))
    return fig


def term_scatter(frame: pd.DataFrame) -> go.Figure:
    """Pretrained-model term (x) vs finetuned-model term (y), one colour per sign of total,
    with quadrant lines and the ``total = 0`` diagonal."""
    fig = go.Figure()
    for name, mask, color in (("helpful (total > 0)", frame["total"] > 0, HELPFUL_COLOR),
                              ("harmful (total < 0)", frame["total"] < 0, HARMFUL_COLOR)):
        part = frame[mask]
        fig.add_trace(go.Scatter(
            x=part["pretrained_term"], y=part["finetuned_term"], mode="markers", name=name,
            customdata=part["example_id"].to_numpy(), hovertext=_hover(part), hoverinfo="text",
            marker=dict(color=color, size=5, opacity=0.7)))
    lim = float(np.abs(frame[["pretrained_term", "finetuned_term"]].to_numpy()).max()) \
        if len(frame) else 1.0
    fig.add_hline(y=0, line=dict(color="#999", width=1))
    fig.add_vline(x=0, line=dict(color="#999", width=1))
    fig.add_trace(go.Scatter(x=[-lim, lim], y=[lim, -lim], mode="lines", name="total = 0",
                             hoverinfo="skip", line=dict(color="#bbb", dash="dot")))
    fig.update_layout(title=dict(text="Pretrained term vs finetuned term", font=dict(size=13)),
                      xaxis_title="pretrained_term", yaxis_title="finetuned_term", height=360,
                      margin=_MARGIN, legend=dict(orientation="h", y=-0.25))
    return fig


def score_histogram(values: np.ndarray, bins: int = 60, title: str = "Histogram of total scores",
                    counted: str = "examples") -> go.Figure:
    """Histogram computed here (only bin counts go to the browser), bars in sign colours."""
    values = np.asarray(values, dtype=float)
    fig = go.Figure()
    if len(values):
        counts, edges = np.histogram(values, bins=bins)
        centers = (edges[:-1] + edges[1:]) / 2
        fig.add_trace(go.Bar(x=centers, y=counts, width=np.diff(edges),
                             marker_color=[sign_color(c) for c in centers],
                             hovertemplate=f"score %{{x:.3g}}<br>%{{y}} {counted}<extra></extra>",
                             showlegend=False))
    fig.add_vline(x=0, line=dict(color="#555", width=1, dash="dot"))
    fig.update_layout(title=dict(text=title, font=dict(size=13)), xaxis_title="total score",
                      yaxis_title=counted, bargap=0, height=360, margin=_MARGIN)
    return fig


def term_split_bars(frame: pd.DataFrame, max_rows: int = 30) -> go.Figure:
    """Per example: the pretrained term (solid) and the finetuned term (hatched) stacked on a
    diverging axis, each segment in its sign colour; a black diamond marks the total."""
    part = frame.head(max_rows).iloc[::-1]  # plotly draws the first category at the bottom
    y = [f"{e} ({lab})" for e, lab in zip(part["example_id"], part["label_name"], strict=True)]
    fig = go.Figure()
    for col, pattern, name in (("pretrained_term", "", "pretrained_term (solid)"),
                               ("finetuned_term", "/", "finetuned_term (hatched)")):
        vals = part[col].to_numpy(dtype=float)
        fig.add_trace(go.Bar(
            y=y, x=vals, orientation="h", name=name, showlegend=False,
            marker=dict(color=[sign_color(v) for v in vals],
                        pattern=dict(shape=pattern, fgcolor="#fff", size=5),
                        line=dict(color="#333", width=0.5)),
            hovertemplate=f"%{{y}}<br>{col} %{{x:.3g}}<extra></extra>"))
        # Legend entry in neutral grey: the bar colours themselves encode the sign.
        fig.add_trace(go.Bar(y=[None], x=[None], orientation="h", name=name,
                             marker=dict(color="#999", pattern=dict(shape=pattern, fgcolor="#fff",
                                                                    size=5))))
    fig.add_trace(go.Scatter(y=y, x=part["total"], mode="markers", name="total",
                             marker=dict(symbol="diamond", color="#111", size=8),
                             hovertemplate="%{y}<br>total %{x:.3g}<extra></extra>"))
    fig.add_vline(x=0, line=dict(color="#555", width=1))
    fig.update_layout(barmode="relative", height=max(260, 22 * len(part) + 110),
                      title=dict(text="Split of each score: pretrained_term + finetuned_term "
                                      "= total", font=dict(size=13)),
                      xaxis_title="score", margin=_MARGIN, legend=dict(orientation="h", y=-0.12))
    return fig


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
