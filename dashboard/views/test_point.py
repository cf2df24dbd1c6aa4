"""Test point explorer: pick a test point (deep link ``?test_id=``), see the strongest
evidence at a glance (thumbnails of its most harmful and most helpful pretraining examples
beside the test image), then explore, flag and export it in the evidence section; below it,
the finetuning examples that helped or hurt it (:mod:`dashboard.finetune_evidence`), with the
verdict "pretraining vs finetuning data" for a misclassified point.

The header (navigation, test image, probabilities, strips) is rebuilt only when the test point
or the navigation changes; the evidence section (:mod:`dashboard.evidence`) is a fragment that
reruns on its own for filter changes, flag edits and map interactions.  Navigation widgets and
filters are bound to the URL, so reloads, back / forward and shared links restore them.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import session
from dashboard.evidence import evidence_section
from dashboard.evidence_data import point_data
from dashboard.evidence_strip import evidence_strips
from dashboard.example_display import show_payload
from dashboard.finetune_evidence import finetune_point, finetune_section
from dashboard.md_escape import md_code, md_escape
from dashboard.run_details import class_names, label_name, probability_columns
from dashboard.test_point_list import SUBSETS, list_test_points

_BOUND = dict(bind="query-params", persist_state="session")

run = session.current_run()
tindex = session.test_index(run.run_id, run)
ft_names = class_names(run, "finetune")

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
    subset = n1.radio("Show", SUBSETS, key="nav_subset", horizontal=True, **_BOUND)
    true_sel = n2.multiselect("True class", list(range(len(ft_names))), key="nav_true",
                              format_func=lambda i: ft_names[i], placeholder="any", **_BOUND)
    pred_sel = n3.multiselect("Predicted class", list(range(len(ft_names))), key="nav_pred",
                              format_func=lambda i: ft_names[i], placeholder="any", **_BOUND)
    sort_by = n4.selectbox("Sort by (highest first)", ("loss", "confidence"), key="nav_sort",
                           **_BOUND)
    mis_first = n4.checkbox("Misclassified first", value=True, key="nav_mis_first", **_BOUND)
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
ok = bool(point["correct"])
scores = point_data(run, row)

# --- header: the test point and the strongest evidence ----------------------------------------
left, right = st.columns([1.3, 3])
with left:
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
    m1, m2, m3 = st.columns(3)
    m1.metric("helpful examples", f"{scores.n_helpful:,}")
    m2.metric("harmful examples", f"{scores.n_harmful:,}")
    m3.metric("sum of total", f"{scores.total_sum:.3g}")
    ft_point = finetune_point(run, row)
    if ft_point is not None and not ok:
        st.caption(f":material/call_split: {ft_point.verdict.sentence()} (first order; "
                   "details under *Finetuning examples* below)")
with right:
    evidence_strips(run, scores, ok)

# --- evidence: filters, what-if, map, tables, charts, export (one fragment) --------------------
st.divider()
evidence_section(run, current, row, ok)
st.divider()
finetune_section(run, current, row, ok)
