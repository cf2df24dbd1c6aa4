"""The influence map of the Test point page (no Streamlit here): pretraining examples at their
stored 2-D coordinates, coloured by score (default), pretraining label, flag status or
pretraining loss, the test point as a star.

Examples that do not pass the filters stay on the map as a grey trace (not hidden), and the
axes and the colour range come from the whole run / the whole score row, so neither moves while
filtering.  Each coloured point carries its ``example_id`` as ``customdata`` so a box / lasso
selection maps back to ids (:func:`dashboard.charts.selected_example_ids`); the grey points
carry none, so selecting them selects nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.convention import DIVERGING_SCALE

#: Colour modes of the map (the ``map_colour`` selectbox), with their labels.
MAP_COLOURS = {"score": "total score", "label": "pretraining label",
               "flag": "flag status", "pretrain_loss": "pretraining loss"}
FILTERED_OUT = "filtered out"
GREY = "#cfcfcf"
FLAGGED_COLOR = "#762a83"  # purple: neither the helpful blue nor the harmful red
UNFLAGGED_COLOR = "#8c8c8c"
#: Label colours (no pure blue or red, which mean helpful / harmful everywhere else).
LABEL_PALETTE = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
                 "#17becf", "#bcbd22", "#525252", "#8dd3c7", "#fdb462")
LOSS_SCALE = "YlGn"
MAX_LABEL_TRACES = len(LABEL_PALETTE)
_HOVER = "%{customdata[0]} · label %{customdata[1]}<br>total %{customdata[2]}<extra></extra>"


@dataclass(frozen=True)
class MapScales:
    """Fixed ranges of the map: axes (whole run), score colour bound (whole score row),
    pretraining-loss colour range (whole run) and the pretraining class names."""

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    score_bound: float
    loss_range: tuple[float, float] | None
    label_names: Sequence[str]


def colour_options(has_loss: bool) -> list[str]:
    """The colour modes available for a run (pretraining loss only when the run has it)."""
    return [c for c in MAP_COLOURS if has_loss or c != "pretrain_loss"]


def _points(xy: np.ndarray, frame: pd.DataFrame) -> np.ndarray:
    rows = frame["row"].to_numpy()
    return np.asarray(xy[rows], dtype=float).reshape(-1, 2) if len(rows) else np.zeros((0, 2))


def hover_data(frame: pd.DataFrame) -> np.ndarray:
    """``customdata`` rows: id first (what a selection returns), then label and total for the
    hover; all text (a unicode array encodes ~3x faster than an object array)."""
    if not len(frame):
        return np.zeros((0, 3), dtype=str)
    return np.stack([frame["example_id"].to_numpy(dtype=str),
                     frame["label_name"].to_numpy(dtype=str),
                     np.char.mod("%.3g", frame["total"].to_numpy(dtype=float))], axis=1)


def _trace(xy: np.ndarray, frame: pd.DataFrame, name: str, marker: dict,
           showlegend: bool = True) -> go.Scattergl:
    pts = _points(xy, frame)
    return go.Scattergl(x=pts[:, 0], y=pts[:, 1], mode="markers", name=name,
                        customdata=hover_data(frame), hovertemplate=_HOVER, marker=marker,
                        showlegend=showlegend)


def _coloured_traces(xy: np.ndarray, shown: pd.DataFrame, colour: str,
                     scales: MapScales) -> list[go.Scattergl]:
    edge = dict(width=0.3, color="#888")
    if colour == "label":
        labels = shown["label"].to_numpy(dtype=int)
        n_labels = len(scales.label_names)
        if n_labels > MAX_LABEL_TRACES:
            colors = [LABEL_PALETTE[v % len(LABEL_PALETTE)] for v in labels]
            return [_trace(xy, shown, "pretraining examples",
                           dict(color=colors, size=6, line=edge), showlegend=False)]
        traces = []
        for lab in range(n_labels):
            part = shown[labels == lab]
            name = scales.label_names[lab]
            traces.append(_trace(xy, part, f"label {name}",
                                 dict(color=LABEL_PALETTE[lab], size=6, line=edge)))
        return traces
    if colour == "flag":
        flagged = shown["flagged"].to_numpy(dtype=bool)
        return [_trace(xy, shown[~flagged], "not flagged",
                       dict(color=UNFLAGGED_COLOR, size=5, opacity=0.8)),
                _trace(xy, shown[flagged], "flagged",
                       dict(color=FLAGGED_COLOR, size=9, line=dict(width=1, color="#fff")))]
    if colour == "pretrain_loss" and "pretrain_loss" in shown.columns:
        lo, hi = scales.loss_range or (0.0, 1.0)
        return [_trace(xy, shown, "pretraining examples", dict(
            color=shown["pretrain_loss"].to_numpy(dtype=float), colorscale=LOSS_SCALE,
            cmin=lo, cmax=hi, size=6, line=edge,
            colorbar=dict(title="pretraining<br>loss", thickness=12)))]
    bound = scales.score_bound
    return [_trace(xy, shown, "pretraining examples", dict(
        color=shown["total"].to_numpy(dtype=float), colorscale=DIVERGING_SCALE, cmid=0.0,
        cmin=-bound, cmax=bound, size=6, line=edge,
        colorbar=dict(title="total<br>score", thickness=12)))]


def influence_map(shown: pd.DataFrame, greyed: pd.DataFrame, xy: np.ndarray,
                  test_xy: tuple[float, float] | None, test_id: str, scales: MapScales,
                  colour: str = "score") -> go.Figure:
    """The map: ``greyed`` rows (filtered out) as one grey trace underneath, ``shown`` rows
    (passing the filters) coloured by ``colour`` (a key of :data:`MAP_COLOURS`), the test point
    as a star; axes fixed to ``scales.x_range`` / ``scales.y_range``."""
    traces: list = []
    if len(greyed):
        pts = _points(xy, greyed)
        traces.append(go.Scattergl(
            x=pts[:, 0], y=pts[:, 1], mode="markers", name=FILTERED_OUT, hoverinfo="skip",
            marker=dict(color=GREY, size=4, opacity=0.6)))
    traces += _coloured_traces(xy, shown, colour, scales)
    if test_xy is not None:
        traces.append(go.Scatter(
            x=[test_xy[0]], y=[test_xy[1]], mode="markers", name=f"test point {test_id}",
            hoverinfo="name", marker=dict(symbol="star", size=18, color="#111",
                                          line=dict(width=1.5, color="#ffd700"))))
    layout = dict(
        dragmode="select", height=460, margin=dict(l=10, r=10, t=30, b=10), showlegend=True,
        legend=dict(orientation="h", y=-0.05), uirevision=f"map-{test_id}",
        xaxis=dict(showticklabels=False, range=list(scales.x_range), autorange=False,
                   zeroline=False),
        yaxis=dict(showticklabels=False, range=list(scales.y_range), autorange=False,
                   zeroline=False))
    return go.Figure(data=traces, layout=layout)


def finetune_map(frame: pd.DataFrame, pretrain_xy: np.ndarray,
                 test_xy: tuple[float, float] | None, test_id: str, scales: MapScales,
                 bound: float) -> go.Figure:
    """The finetuning examples (``frame``: ``map_x``, ``map_y``, ``example_id``,
    ``label_name``, ``score``, ``flagged``) on the run's map, coloured by their finetuning-data
    score (same diverging scale, range +-``bound`` from the whole row), over the pretraining
    examples in grey; flagged ones ringed; axes fixed as on the pretraining map."""
    pre = np.asarray(pretrain_xy, dtype=float).reshape(-1, 2)
    flagged = frame["flagged"].to_numpy(dtype=bool)
    traces: list = [go.Scattergl(x=pre[:, 0], y=pre[:, 1], mode="markers",
                                 name="pretraining examples", hoverinfo="skip",
                                 marker=dict(color=GREY, size=3, opacity=0.5))]
    custom = np.column_stack([frame["example_id"].astype(str), frame["label_name"].astype(str),
                              [f"{v:.3e}" for v in frame["score"]]])
    traces.append(go.Scatter(
        x=frame["map_x"], y=frame["map_y"], mode="markers", name="finetuning examples",
        customdata=custom,
        hovertemplate="%{customdata[0]} · label %{customdata[1]}<br>score %{customdata[2]}"
                      "<extra></extra>",
        marker=dict(color=frame["score"], colorscale=DIVERGING_SCALE, cmid=0,
                    cmin=-bound, cmax=bound, size=9, symbol="diamond",
                    line=dict(width=np.where(flagged, 2.5, 0.5).tolist(),
                              color=np.where(flagged, FLAGGED_COLOR, "#555").tolist()),
                    colorbar=dict(title="score", thickness=12))))
    if test_xy is not None:
        traces.append(go.Scatter(
            x=[test_xy[0]], y=[test_xy[1]], mode="markers", name=f"test point {test_id}",
            hoverinfo="name", marker=dict(symbol="star", size=18, color="#111",
                                          line=dict(width=1.5, color="#ffd700"))))
    return go.Figure(data=traces, layout=dict(
        height=380, margin=dict(l=10, r=10, t=30, b=10), legend=dict(orientation="h", y=-0.05),
        uirevision=f"ftmap-{test_id}",
        xaxis=dict(showticklabels=False, range=list(scales.x_range), autorange=False,
                   zeroline=False),
        yaxis=dict(showticklabels=False, range=list(scales.y_range), autorange=False,
                   zeroline=False)))
