"""The evidence section of the Test point page: filters, the what-if line, the map, the ranked
tables with flagging, the term charts and the export, all in one ``st.fragment``.

A filter change, a flag edit, a map selection or a map colour change reruns only this section;
the page header (navigation, test image, probabilities, thumbnail strips) is not rebuilt.
:func:`evidence_body` is the plain function (the benchmark times it directly; AppTest always
reruns whole pages), :func:`evidence_section` its fragment.  Everything it needs per test point
comes from the caches of :mod:`dashboard.evidence_data`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import session
from dashboard.charts import score_histogram, selected_example_ids, term_scatter, term_split_bars
from dashboard.evidence_data import (
    MAP_RANDOM,
    MAP_TOP,
    PointData,
    evidence_order,
    point_data,
    run_constants,
    with_flags,
)
from dashboard.example_display import SHADE_MAX_ROWS, evidence_table_view
from dashboard.export_panel import export_buttons
from dashboard.filter_controls import describe, filter_panel
from dashboard.filters import FilterSpec, apply_filters, filter_mask, sample_positions
from dashboard.flag_controls import flag_all_shown, flag_editor, guarded_read, reason_inputs
from dashboard.map_chart import MAP_COLOURS, MapScales, colour_options, influence_map
from dashboard.md_escape import md_code, md_escape
from dashboard.run_details import class_names
from dashboard.terms import SENTENCE, term_tooltip
from dashboard.what_if_panel import point_what_if
from engine.artifacts import Run

TABLE_CAP = 1000  # rows sent to the browser per table
SCATTER_CAP = 3000
SPLIT_PER_SIGN = 25
GREY_CAP = 2500  # filtered-out points drawn on the map
_NOT_LISTED = ("row", "example_id", "label", "label_name", "text", "flagged", "dominant_term",
               "total", "pretrained_term", "finetuned_term", "pretrain_loss")


def greyed_positions(point: PointData, mask: np.ndarray) -> np.ndarray:
    """Positions of the map's background sample that do not pass the filters (drawn grey)."""
    return point.background[~mask[point.background]][:GREY_CAP]


def sampled(total: np.ndarray, mask: np.ndarray, n_top: int, n_random: int,
            seed: int) -> np.ndarray:
    """Positions of a :func:`~dashboard.filters.sample_positions` draw among the rows of
    ``mask``: the ``n_top`` largest ``|total|`` plus ``n_random`` others."""
    passing = np.flatnonzero(mask)
    return passing[sample_positions(total[passing], n_top, n_random, seed)]


def _map(run: Run, point: PointData, frame: pd.DataFrame, mask: np.ndarray,
         test_id: str, row: int) -> tuple[str, ...] | None:
    """The map with its colour picker; returns the ids selected on it (``None``: none)."""
    consts = run_constants(run)
    options = colour_options(consts.loss_range is not None)
    c1, c2 = st.columns([2, 3], vertical_alignment="bottom")
    colour = c1.selectbox("Colour the map by", options, key="map_colour",
                          bind="query-params", persist_state="session",
                          help=" · ".join(f"**{k}**: {v}" for k, v in MAP_COLOURS.items()
                                          if k in options))
    shown = frame.iloc[sampled(frame["total"].to_numpy(), mask, MAP_TOP, MAP_RANDOM, row)]
    greyed = frame.iloc[greyed_positions(point, mask)]
    n_passing = int(mask.sum())
    what = (f"{len(shown):,} of {n_passing:,} (the {MAP_TOP:,} largest |score| + a random "
            "sample)" if len(shown) < n_passing else f"all {n_passing:,}")
    n_out = len(frame) - n_passing
    grey = ("" if not n_out else f" · {n_out:,} filtered out in grey" if len(greyed) == n_out
            else f" · {len(greyed):,} of the {n_out:,} filtered out in grey")
    c2.markdown(f"**Map: influence on {md_code(test_id)}** · {what} examples passing the "
                f"filters{grey} · box / lasso select to filter the tables",
                help="Axes and colour range are those of the whole run and of this test "
                     "point's whole score row: they do not move while filtering.")
    scales = MapScales(consts.x_range, consts.y_range, point.score_bound, consts.loss_range,
                       class_names(run, "pretrain"))
    test_xy = tuple(float(v) for v in run.test_xy[row])
    map_gen = st.session_state.get("map_gen", 0)
    event = st.plotly_chart(
        influence_map(shown, greyed, run.pretrain_xy, test_xy, test_id, scales, colour or "score"),
        key=f"map_{run.run_id}_{test_id}_{map_gen}", on_select="rerun",
        selection_mode=("box", "lasso"), config={"displaylogo": False})
    selected = selected_example_ids(event)
    if selected is not None:
        st.caption(f"{len(selected)} examples selected on the map filter the tables below.")
        st.button("Clear map selection", key="clear_map",
                  on_click=lambda: st.session_state.update(map_gen=map_gen + 1))
    return selected


def _tables(run: Run, point: PointData, view: pd.DataFrame, spec: FilterSpec, test_id: str,
            correct: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two ranked tables in evidence order, then "Flag all shown"; returns the (capped)
    helpful and harmful rows shown."""
    consts = run_constants(run)
    extra = [c for c in view.columns if c not in _NOT_LISTED] + ["dominant_term"]
    parts = {"helpful": view[view["total"] > 0],
             "harmful": view[view["total"] < 0].sort_values("total", kind="stable")}
    n_zero = len(view) - len(parts["helpful"]) - len(parts["harmful"])
    if n_zero:
        st.caption(f"{n_zero:,} examples with a score of exactly 0 are in the view but not "
                   "listed.")
    shown: dict[str, pd.DataFrame] = {}
    for sign in evidence_order(correct):
        part = parts[sign]
        shown[sign] = part.head(TABLE_CAP)
        if spec.sign != "both" and part.empty:
            continue
        st.markdown(f"#### Most {sign} ({len(part):,})")
        if part.empty:
            st.caption("No examples pass the filters.")
            continue
        if len(part) > TABLE_CAP:
            st.caption(f"Showing the first {TABLE_CAP:,} of {len(part):,}; the export holds all.")
            part = shown[sign]
        display, config, style = evidence_table_view(
            run, part, sign, point.total_max, point.cell_bound, consts.noise_threshold, extra)
        if style is None:
            st.caption(f"Score cells are shaded by sign and size in tables of up to "
                       f"{SHADE_MAX_ROWS} rows (lower top-k to see it).")
        flag_editor(run, part, display, config, key=f"tbl_{sign}_{test_id}", test_id=test_id,
                    height=min(40 * len(part) + 40, 520), style=style)
    ids = [e for sign in evidence_order(correct) for e in shown[sign]["example_id"]]
    flag_all_shown(run, ids, test_id, helpful_ids=shown["helpful"]["example_id"].tolist())
    return shown["helpful"], shown["harmful"]


def _body(run: Run, test_id: str, row: int, correct: bool) -> None:
    store = session.flag_store(run)
    flagged_ids = guarded_read(store.flagged_ids, run.run_id)
    point = point_data(run, row)
    spec = filter_panel(run)
    point_what_if(run, flagged_ids, test_id)
    frame = with_flags(run, point.frame, flagged_ids)
    total = frame["total"].to_numpy()
    mask = filter_mask(frame, spec.replace(top_k=None))  # the map: no top-k, no selection

    left, right = st.columns([3, 2])
    with left:
        selected = _map(run, point, frame, mask, test_id, row)
    if selected is not None:
        spec = spec.replace(selected_ids=selected)
        mask = filter_mask(frame, spec.replace(top_k=None))
    scatter_rows = frame.iloc[sampled(total, mask, 1000, SCATTER_CAP - 1000, row)]
    right.plotly_chart(term_scatter(scatter_rows), key="term_scatter",
                       config={"displayModeBar": False})

    view = apply_filters(frame, spec)
    names = class_names(run, "pretrain")
    st.markdown(f"**{len(view):,} examples shown** · {md_escape(describe(spec, names), 1000)}")
    reason_inputs()
    st.markdown(SENTENCE, help=term_tooltip(run))
    helpful, harmful = _tables(run, point, view, spec, test_id, correct)

    c1, c2 = st.columns([3, 2])
    c1.plotly_chart(term_split_bars(helpful, harmful, per_sign=SPLIT_PER_SIGN,
                                    harmful_first=evidence_order(correct)[0] == "harmful"),
                    key="split_bars", config={"displayModeBar": False})
    c2.plotly_chart(score_histogram(total[mask],
                                    title="Histogram of total scores (filters, no top-k)"),
                    key="histogram", config={"displayModeBar": False})

    st.subheader("Export this view")
    st.caption("The same rows as the tables above (filters, top-k and map selection), with "
               "scores for this test point and flag columns; the zip adds manifest.json and "
               "ids.txt.")
    export_buttons(run, "view", key="export_view", spec=spec, test_id=test_id,
                   n_rows=len(view))


def evidence_body(run: Run, test_id: str, row: int, correct: bool) -> None:
    """Render the evidence section of test point ``test_id`` (score row ``row``; ``correct``:
    whether the model gets it right, which decides whether harmful or helpful comes first).
    Errors of the run files or the flag store become one message (as on the rest of the page:
    inside a fragment they would not reach the page's handler)."""
    try:
        _body(run, test_id, row, correct)
    except session.PAGE_ERRORS as exc:
        session.show_page_error(exc)


#: :func:`evidence_body` as a fragment: its widgets rerun only this section.
evidence_section = st.fragment(evidence_body)
