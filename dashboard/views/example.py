"""One pretraining example (deep link ``?example_id=``): payload, label, metadata, flag state and
the test points it harms and helps most, with links to them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import session
from dashboard.charts import score_histogram
from dashboard.convention import SCORE_COLUMNS
from dashboard.example_display import SCORE_FORMAT, TEST_PAGE_URL, show_payload, test_links
from dashboard.filters import most_harmful
from dashboard.flag_controls import (
    NOTE_KEY,
    REASON_KEY,
    guarded_read,
    guarded_write,
    reason_inputs,
    show_store_error,
)
from dashboard.md_escape import md_code, md_escape
from dashboard.run_details import class_names, label_name, metadata_columns

run = session.current_run()
store = session.flag_store(run)
eindex = session.example_index(run.run_id, run)
pre_names = class_names(run, "pretrain")
ft_names = class_names(run, "finetune")

st.title("Pretraining example")
st.text_input("Example id", key=session.EXAMPLE_KEY, bind="query-params",
              help="Kept in the URL (?example_id=...).")


def _set_example(example_id: str) -> None:
    st.session_state[session.EXAMPLE_KEY] = example_id


def _pick() -> None:
    if st.session_state.get("ex_pick"):
        _set_example(st.session_state["ex_pick"])


wanted = str(st.session_state.get(session.EXAMPLE_KEY) or "").strip()
if not wanted or wanted not in eindex:
    if wanted:
        example = (f", e.g. {md_code(run.pretrain_examples['example_id'].iloc[0])}"
                   if run.n_pretrain else "")
        st.error(f"Pretraining example {md_code(wanted)} (from the URL or the box above) is not "
                 f"in run {md_code(run.path.name)} ({run.n_pretrain:,} examples{example}). "
                 "Type another id above or pick one below.", icon=":material/error:")
    if not run.n_pretrain:
        st.info("This run has no pretraining examples.")
        st.stop()
    mis = session.influence_over(run.run_id, "misclassified", run)
    suggestions = most_harmful(mis, 50)["example_id"].tolist() or \
        run.pretrain_examples["example_id"].astype(str).head(50).tolist()
    st.selectbox("Or pick one of the examples most harmful to the misclassified test points",
                 suggestions, index=None, key="ex_pick", on_change=_pick)
    st.stop()

col = eindex[wanted]
record = run.pretrain_examples.iloc[col]
flags = guarded_read(store.flags, run.run_id)
flag_row = flags[flags["example_id"] == wanted]

left, right = st.columns([1, 2])
with left:
    show_payload(run, run.pretrain_examples, col, width=180)
with right:
    label = label_name(pre_names, int(record["label"]))
    st.subheader(f"{md_code(wanted)} · label {md_escape(label)}")
    meta = {c: record[c] for c in metadata_columns(run)}
    if "pretrain_loss" in record:
        meta["pretrain_loss"] = f"{float(record['pretrain_loss']):.4f}"
    if meta:
        st.dataframe(pd.DataFrame({"field": list(meta), "value": [str(v) for v in meta.values()]}),
                     hide_index=True, key="ex_meta")
    if flag_row.empty:
        st.markdown("**Not flagged.**")
        reason_inputs()
        if st.button("Flag this example", key="ex_flag", type="primary"):
            guarded_write(store.flag, run.run_id, [wanted],
                          st.session_state.get(REASON_KEY) or "other",
                          st.session_state.get(NOTE_KEY) or "", session.user_name(),
                          st.session_state.get(session.TEST_KEY) or None)
            st.rerun()
    else:
        f = flag_row.iloc[0]
        st.markdown(f":red[:material/flag:] **Flagged** as *{md_escape(f['reason'])}* by "
                    f"{md_escape(f['user'] or '?')} at {md_escape(f['flagged_at'])}"
                    + (f" (from test point {md_code(f['test_id'])})" if f["test_id"] else "")
                    + (f" — {md_escape(f['note'], limit=1000)}" if f["note"] else ""))
        show_store_error()
        if st.button("Unflag", key="ex_unflag"):
            guarded_write(store.unflag, run.run_id, [wanted], session.user_name())
            st.rerun()

# --- the test points it harms / helps most ---------------------------------------------------
tp = run.test_points
per_test = pd.DataFrame({
    "test_id": tp["test_id"].astype(str).to_numpy(),
    "true": [label_name(ft_names, int(v)) for v in tp["label"]],
    "pred": [label_name(ft_names, int(v)) for v in tp["pred"]],
    "correct": tp["correct"].astype(bool).to_numpy(),
    "loss": tp["loss"].to_numpy(dtype=float),
    **{name: np.asarray(run.scores[name][:, col]) for name in SCORE_COLUMNS},
})
totals = per_test["total"].to_numpy()
c = st.columns(3)
c[0].metric("test points helped", f"{int((totals > 0).sum()):,}")
c[1].metric("test points harmed", f"{int((totals < 0).sum()):,}")
c[2].metric("mean total score", f"{float(totals.mean()):.3g}")

k = st.slider("Test points per list", 5, 50, 10, key="ex_k")
config = {"link": st.column_config.LinkColumn("test_id", display_text=r"test_id=(.*)$",
                                              help="Open the test point page in a new tab")}
config.update({n: st.column_config.NumberColumn(n, format=SCORE_FORMAT) for n in SCORE_COLUMNS})
lists = (("Test points it harms most", per_test[per_test["total"] < 0].nsmallest(k, "total"),
          "ex_harms"),
         ("Test points it helps most", per_test[per_test["total"] > 0].nlargest(k, "total"),
          "ex_helps"))
for title, part, key in lists:
    st.markdown(f"#### {title}")
    shown = part.assign(link=test_links(part["test_id"].tolist(), run.path.name))
    shown = shown[["link", "true", "pred", "correct", "loss", *SCORE_COLUMNS]]
    st.dataframe(shown, hide_index=True, column_config=config, key=key)

choices = pd.concat([lists[0][1], lists[1][1]])["test_id"].tolist()
if choices:
    o1, o2 = st.columns([4, 1], vertical_alignment="bottom")
    target = o1.selectbox("Open a test point here", choices, key="ex_open_pick")
    o2.button("Open", key="ex_open", on_click=session.open_test_point, args=(target,))
st.caption(f"Links open `{TEST_PAGE_URL}?test_id=...` in a new tab.")

st.plotly_chart(score_histogram(totals, bins=40, counted="test points",
                                title="This example's total score on each test point"),
                key="ex_hist", config={"displayModeBar": False})
