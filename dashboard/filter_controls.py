"""Sidebar widgets that build the :class:`~dashboard.filters.FilterSpec` of the test point page.

Widget values are kept for the whole session (``persist_state="session"``), so the same filters
apply when coming back to the page; every widget has a ``f_...`` key (AppTest / Playwright).
"""

from __future__ import annotations

import streamlit as st

from dashboard.filters import DOMINANT_TERMS, FLAG_STATUSES, SIGNS, FilterSpec
from dashboard.run_details import class_names, group_columns, render_spec
from engine.artifacts import Run

SIGN_LABELS = {"both": "both", "helpful": "helpful (> 0)", "harmful": "harmful (< 0)"}
MAX_TOP_K = 1000


def sidebar_filters(run: Run) -> FilterSpec:
    """Render the filter widgets in the sidebar and return the spec they describe
    (without a map selection, which the page adds)."""
    sb = st.sidebar
    sb.subheader("Filters")
    sign = sb.radio("Sign of the total score", SIGNS, key="f_sign", horizontal=True,
                    format_func=SIGN_LABELS.get, persist_state="session")
    top_k = sb.number_input(
        "Top-k per sign (0 = all rows)", min_value=0, max_value=MAX_TOP_K, value=20, step=5,
        key="f_top_k", persist_state="session",
        help="Keep the k most helpful and/or the k most harmful examples.")
    names = class_names(run, "pretrain")
    labels = sb.multiselect("Pretraining label", list(range(len(names))),
                            format_func=lambda i: names[i], key="f_labels",
                            persist_state="session", placeholder="all labels")
    group_column, groups = None, ()
    metadata = [c for c in group_columns(run) if c != "label"]
    if metadata:
        group_column = sb.selectbox("Group column", metadata, key="f_group_column",
                                    persist_state="session")
        values = sorted(run.pretrain_examples[group_column].astype(str).unique())
        groups = tuple(sb.multiselect(f"{group_column} values", values,
                                      key=f"f_groups_{group_column}",
                                      persist_state="session", placeholder="all values"))
    c1, c2 = sb.columns(2)
    score_min = c1.number_input("total ≥", value=None, format="%.2e", step=1e-4,
                                key="f_score_min", persist_state="session")
    score_max = c2.number_input("total ≤", value=None, format="%.2e", step=1e-4,
                                key="f_score_max", persist_state="session")
    dominant = sb.radio("Dominant term (larger |term|)", DOMINANT_TERMS, key="f_dominant",
                        horizontal=True, persist_state="session")
    flag_status = sb.radio("Flags", FLAG_STATUSES, key="f_flag_status", horizontal=True,
                           persist_state="session")
    text_query = ""
    if render_spec(run).kind == "text":
        text_query = sb.text_input("Search text", key="f_search", persist_state="session")
    else:
        text_query = sb.text_input("Search example id", key="f_search", persist_state="session")
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
