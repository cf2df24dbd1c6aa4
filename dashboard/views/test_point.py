"""Test point explorer: pick a test point (deep link ``?test_id=``), see its most helpful and
most harmful pretraining examples under the sidebar filters, the map, the term split, flag and
export."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import session
from dashboard.charts import (
    influence_map,
    score_histogram,
    selected_example_ids,
    term_scatter,
    term_split_bars,
)
from dashboard.example_display import example_table_view, show_payload
from dashboard.export_panel import export_buttons
from dashboard.filter_controls import describe, sidebar_filters
from dashboard.filters import apply_filters, map_sample, score_frame
from dashboard.flag_controls import flag_all_shown, flag_editor, guarded_read, reason_inputs
from dashboard.md_escape import md_code, md_escape
from dashboard.run_details import class_names, label_name, probability_columns
from dashboard.test_point_list import SUBSETS, list_test_points

TABLE_CAP = 1000  # rows sent to the browser per table
SCATTER_CAP = 3000
MAP_TOP, MAP_RANDOM = 1500, 2500  # map points: largest |score| + a random sample of the rest
SCORES = ("total", "pretrained_term", "finetuned_term")

run = session.current_run()
store = session.flag_store(run)
tindex = session.test_index(run.run_id, run)
ft_names = class_names(run, "finetune")
pre_names = class_names(run, "pretrain")
spec = sidebar_filters(run)

st.title("Test point explorer")
if run.manifest.get("approximation"):
    st.caption(":material/info: Approximate scores: "
               f"{md_escape(run.manifest['approximation'], limit=1000)}.")


def _set_test(test_id: str) -> None:
    st.session_state[session.TEST_KEY] = test_id


def _pick_changed() -> None:
    if st.session_state.get("nav_pick"):
        _set_test(st.session_state["nav_pick"])


# --- navigation ---------------------------------------------------------------------------
with st.container(border=True):
    n1, n2, n3, n4 = st.columns([2, 2, 2, 2])
    subset = n1.radio("Show", SUBSETS, key="nav_subset", horizontal=True,
                      format_func=str.capitalize, persist_state="session")
    true_sel = n2.multiselect("True class", list(range(len(ft_names))), key="nav_true",
                              format_func=lambda i: ft_names[i], persist_state="session",
                              placeholder="any")
    pred_sel = n3.multiselect("Predicted class", list(range(len(ft_names))), key="nav_pred",
                              format_func=lambda i: ft_names[i], persist_state="session",
                              placeholder="any")
    sort_by = n4.selectbox("Sort by (highest first)", ("loss", "confidence"), key="nav_sort",
                           persist_state="session")
    mis_first = n4.checkbox("Misclassified first", value=True, key="nav_mis_first",
                            persist_state="session")
    listing = list_test_points(run.test_points, subset or "all", true_sel, pred_sel,
                               sort_by or "loss", misclassified_first=mis_first)
    ids = listing["test_id"].astype(str).tolist()

    wanted = str(st.session_state.get(session.TEST_KEY) or "").strip()
    if wanted and wanted not in tindex:
        example = (f", e.g. {md_code(run.test_points['test_id'].iloc[0])}" if run.n_test else "")
        st.error(f"Test point {md_code(wanted)} (from the URL or the sidebar) is not in run "
                 f"{md_code(run.path.name)} ({run.n_test} test points{example}). Pick one "
                 "below, or clear the id (button below, or the sidebar's test point id).",
                 icon=":material/error:")
        st.button("Clear the test id", key="clear_test_id", on_click=_set_test, args=("",))
    unknown = bool(wanted) and wanted not in tindex
    # An unknown id never shows another test point in its place: the page stops below the
    # navigation (the picker, Prev / Next and the clear button say what to do).
    current = wanted if wanted in tindex else (ids[0] if ids and not unknown else None)

    descriptions = session.test_descriptions(run.run_id, run)
    st.session_state["nav_pick"] = current if current in ids else None
    p1, p2, p3 = st.columns([6, 1, 1], vertical_alignment="bottom")
    p1.selectbox(f"Test point ({len(ids)} in this list)", ids, key="nav_pick",
                 format_func=descriptions.__getitem__, on_change=_pick_changed, index=None,
                 placeholder="the current test point is not in this list")
    pos = ids.index(current) if current in ids else -1
    p2.button("◀ Prev", key="nav_prev", disabled=pos <= 0, on_click=_set_test,
              args=(ids[pos - 1] if pos > 0 else "",))
    p3.button("Next ▶", key="nav_next", disabled=pos < 0 or pos >= len(ids) - 1,
              on_click=_set_test, args=(ids[pos + 1] if 0 <= pos < len(ids) - 1 else "",))

if current is None:
    if not unknown:
        st.info("No test point matches the navigation filters.")
    st.stop()

row = tindex[current]
point = run.test_points.iloc[row]

# --- the test point and the map -----------------------------------------------------------
flagged_ids = guarded_read(store.flagged_ids, run.run_id)
frame = score_frame(session.examples(run.run_id, run), run.scores, row, flagged_ids)
on_map = apply_filters(frame, spec.replace(top_k=None))  # filters without top-k and selection

left, right = st.columns([2, 3])
with left:
    ok = bool(point["correct"])
    st.subheader(f"Test point {md_code(current)} "
                 + (":green-badge[:material/check: correct]" if ok
                    else ":red-badge[:material/close: misclassified]"))
    show_payload(run, run.test_points, row, width=150)
    true_name = label_name(ft_names, int(point["label"]))
    pred_name = label_name(ft_names, int(point["pred"]))
    st.markdown(f"**True:** {md_escape(true_name)} · **Predicted:** {md_escape(pred_name)} · "
                f"**loss** {float(point['loss']):.4f}"
                + (f" · **confidence** {float(point['confidence']):.3f}"
                   if "confidence" in point else ""))
    probs = probability_columns(run)
    if probs:
        st.dataframe(
            pd.DataFrame({"class": [label_name(ft_names, int(c[5:])) for c in probs],
                          "probability": [float(point[c]) for c in probs]}),
            hide_index=True, key="probs",
            column_config={"probability": st.column_config.ProgressColumn(
                "probability", min_value=0.0, max_value=1.0, format="%.3f")})
    totals = frame["total"].to_numpy()
    m1, m2, m3 = st.columns(3)
    m1.metric("helpful examples", f"{int((totals > 0).sum()):,}")
    m2.metric("harmful examples", f"{int((totals < 0).sum()):,}")
    m3.metric("sum of total", f"{float(totals.sum()):.3g}")

with right:
    map_gen = st.session_state.get("map_gen", 0)
    map_key = f"map_{run.run_id}_{current}_{map_gen}"
    sample = map_sample(on_map, n_top=MAP_TOP, n_random=MAP_RANDOM, seed=row)
    test_xy = tuple(float(v) for v in run.test_xy[row])
    shown = (f"{len(sample):,} of {len(on_map):,} (the {MAP_TOP:,} largest |score| + a random "
             "sample)" if len(sample) < len(on_map) else f"all {len(on_map):,}")
    st.markdown(f"**Map: influence on {md_code(current)}** · {shown} examples passing the "
                "filters · "
                "box / lasso select to filter the tables")
    event = st.plotly_chart(
        influence_map(sample, run.pretrain_xy, test_xy, current),
        key=map_key, on_select="rerun", selection_mode=("box", "lasso"),
        config={"displaylogo": False})
    selected = selected_example_ids(event)
    if selected is not None:
        spec = spec.replace(selected_ids=selected)
        st.caption(f"{len(selected)} examples selected on the map filter the tables below.")
        st.button("Clear map selection", key="clear_map",
                  on_click=lambda: st.session_state.update(map_gen=map_gen + 1))

# --- ranked tables with flagging ------------------------------------------------------------
view = apply_filters(frame, spec)
st.markdown(f"**{len(view):,} examples shown** · {md_escape(describe(spec, pre_names), 1000)}")
reason_inputs()
extra = [c for c in frame.columns if c not in ("row", "example_id", "label", "label_name",
                                               "text", "flagged", "dominant_term") + SCORES]
extra.append("dominant_term")
helpful = view[view["total"] > 0]
harmful = view[view["total"] < 0].sort_values("total", kind="stable")
n_zero = len(view) - len(helpful) - len(harmful)
if n_zero:
    st.caption(f"{n_zero:,} examples with a score of exactly 0 are in the view but not listed.")
shown_ids: list[str] = []
for title, part, key in (("Most helpful", helpful, "tbl_helpful"),
                         ("Most harmful", harmful, "tbl_harmful")):
    if spec.sign != "both" and part.empty:
        continue
    st.markdown(f"#### {title} ({len(part):,})")
    if part.empty:
        st.caption("No examples pass the filters.")
        continue
    if len(part) > TABLE_CAP:
        st.caption(f"Showing the first {TABLE_CAP:,} of {len(part):,}; the export holds all.")
        part = part.head(TABLE_CAP)
    shown_ids += part["example_id"].tolist()
    display, config = example_table_view(run, part, SCORES, extra)
    flag_editor(run, part, display, config, key=f"{key}_{current}", test_id=current,
                height=min(40 * len(part) + 40, 520))
flag_all_shown(run, shown_ids, current)

# --- charts -------------------------------------------------------------------------------
st.plotly_chart(term_split_bars(pd.concat([helpful.head(15), harmful.head(15)])),
                key="split_bars", config={"displayModeBar": False})
c1, c2 = st.columns(2)
unranked = on_map if selected is None else apply_filters(frame, spec.replace(top_k=None))
scatter_rows = map_sample(unranked, n_top=1000, n_random=SCATTER_CAP - 1000, seed=row)
c1.plotly_chart(term_scatter(scatter_rows), key="term_scatter",
                config={"displayModeBar": False})
c2.plotly_chart(score_histogram(unranked["total"].to_numpy(),
                                title="Histogram of total scores (filters, no top-k)"),
                key="histogram", config={"displayModeBar": False})

# --- export -------------------------------------------------------------------------------
st.subheader("Export this view")
st.caption("The same rows as the tables above (filters, top-k and map selection), with scores "
           "for this test point and flag columns; the zip adds manifest.json and ids.txt.")
export_buttons(run, "view", key="export_view", spec=spec, test_id=current, n_rows=len(view))
