"""The filter widgets of the test point page, which build its
:class:`~dashboard.filters.FilterSpec`.

They sit in the main area, in a bordered box at the top of the evidence section (inside its
``st.fragment``, so a filter change reruns only that section).  Every widget has a ``f_...``
key (AppTest / Playwright) and is bound to the URL (``bind="query-params"``, the key is the
parameter name): a reload, the browser's back / forward and a shared link restore the filters;
a value equal to its default is left out of the URL.  URL values are the options as shown
(class names for labels), so options are plain words (``?f_sign=harmful&f_labels=3``).
``persist_state="session"`` keeps them when coming back to the page (the value is then written
back into the URL).
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from dashboard.evidence_data import run_constants
from dashboard.filters import DOMINANT_TERMS, FLAG_STATUSES, SIGNS, FilterSpec
from dashboard.run_details import class_names, render_spec
from engine.artifacts import Run

#: Under each sign option (the options themselves stay plain words: they are the URL values).
SIGN_CAPTIONS = ("", "total > 0", "total < 0")
MAX_TOP_K = 1000
DEFAULT_TOP_K = 20
#: Default of every filter widget (the ``f_groups_<column>`` ones default to ``[]``).
FILTER_DEFAULTS: dict[str, Any] = {
    "f_sign": "both", "f_top_k": DEFAULT_TOP_K, "f_labels": [], "f_score_min": None,
    "f_score_max": None, "f_dominant": "any", "f_flag_status": "all", "f_search": ""}
_BOUND = dict(bind="query-params", persist_state="session")


def _reset(metadata: list[str]) -> None:
    """``on_click`` of "Reset filters": every filter back to its default (and out of the URL)."""
    for key, value in FILTER_DEFAULTS.items():
        st.session_state[key] = value
    if metadata:
        st.session_state["f_group_column"] = metadata[0]
    for key in [k for k in st.session_state if str(k).startswith("f_groups_")]:
        st.session_state[key] = []


def filter_panel(run: Run) -> FilterSpec:
    """Render the filter widgets (bordered box, main area) and return the spec they describe
    (without a map selection, which the page adds)."""
    names = class_names(run, "pretrain")
    group_values = run_constants(run).group_values
    metadata = list(group_values)
    with st.container(border=True, key="filters"):
        r1 = st.columns([3.9, 1.5, 2.5, 3.8] if metadata else [3.9, 1.5, 6.3],
                        vertical_alignment="bottom")
        sign = r1[0].radio("Sign of the total score", SIGNS, key="f_sign", horizontal=True,
                           captions=SIGN_CAPTIONS, **_BOUND)
        top_k = r1[1].number_input(
            "Top-k per sign", min_value=0, max_value=MAX_TOP_K, value=DEFAULT_TOP_K, step=5,
            key="f_top_k", **_BOUND,
            help="Keep the k most helpful and/or the k most harmful examples (0 = all rows).")
        labels = r1[2].multiselect("Pretraining label", list(range(len(names))),
                                   format_func=lambda i: names[i], key="f_labels",
                                   placeholder="all labels", **_BOUND)
        group_column, groups = None, ()
        if metadata:
            g1, g2 = r1[3].columns([2, 3], vertical_alignment="bottom")
            group_column = g1.selectbox("Group column", metadata, key="f_group_column",
                                        **_BOUND)
            groups = tuple(g2.multiselect(f"{group_column} values",
                                          group_values.get(group_column or "", []),
                                          key=f"f_groups_{group_column}",
                                          placeholder="all values", **_BOUND))
        r2 = st.columns([1.4, 1.4, 3.5, 3.5, 2.0, 1.4], vertical_alignment="bottom")
        score_min = r2[0].number_input("total ≥", value=None, format="%.2e", step=1e-4,
                                       key="f_score_min", **_BOUND)
        score_max = r2[1].number_input("total ≤", value=None, format="%.2e", step=1e-4,
                                       key="f_score_max", **_BOUND)
        dominant = r2[2].radio("Dominant term (larger |term|)", DOMINANT_TERMS,
                               key="f_dominant", horizontal=True, **_BOUND)
        flag_status = r2[3].radio("Flags", FLAG_STATUSES, key="f_flag_status",
                                  horizontal=True, **_BOUND)
        what = "Search text" if render_spec(run).kind == "text" else "Search example id"
        text_query = r2[4].text_input(what, key="f_search", **_BOUND)
        r2[5].button("Reset", key="f_reset", on_click=_reset, args=(metadata,),
                     icon=":material/restart_alt:", help="Every filter back to its default")
    return FilterSpec(
        sign=sign or "both", top_k=int(top_k) or None, labels=tuple(int(x) for x in labels),
        group_column=group_column if groups else None, groups=groups,
        score_min=score_min, score_max=score_max, dominant_term=dominant or "any",
        flag_status=flag_status or "all", text_query=(text_query or "").strip())


def describe(spec: FilterSpec, label_names: list[str]) -> str:
    """One line summarising the active filters."""
    parts = [f"sign: {spec.sign}",
             f"top-k: {spec.top_k if spec.top_k else 'all'}{' per sign' if spec.top_k else ''}"]
    if spec.labels:
        parts.append("labels: " + ", ".join(label_names[i] for i in spec.labels))
    if spec.group_column and spec.groups:
        parts.append(f"{spec.group_column}: " + ", ".join(spec.groups))
    if spec.score_min is not None or spec.score_max is not None:
        parts.append(f"total in [{spec.score_min if spec.score_min is not None else '-inf'}, "
                     f"{spec.score_max if spec.score_max is not None else 'inf'}]")
    if spec.dominant_term != "any":
        parts.append(f"dominant: {spec.dominant_term}")
    if spec.flag_status != "all":
        parts.append(spec.flag_status)
    if spec.text_query:
        parts.append(f"search: {spec.text_query!r}")
    if spec.selected_ids is not None:
        parts.append(f"map selection: {len(spec.selected_ids)} examples")
    return " · ".join(parts)
