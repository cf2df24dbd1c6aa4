"""Every flag of the run (who / when / why / from which test point), unflagging, and exports of
the flagged set and of the pretraining set minus the flagged examples."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import session
from dashboard.example_display import example_links, test_links, thumbnails
from dashboard.export_panel import export_buttons
from dashboard.flag_controls import guarded_read, guarded_write, show_store_error
from dashboard.md_escape import md_code, md_escape
from dashboard.run_details import class_names, label_name

run = session.current_run()
store = session.flag_store(run)
eindex = session.example_index(run.run_id, run)
names = class_names(run, "pretrain")

st.title("Flags")
st.caption(f"Stored in {md_code(store.path)} (beside the run; the run directory stays "
           f"read-only), keyed by run_id {md_code(run.run_id)} and example_id.")

flags = guarded_read(store.flags, run.run_id)
if flags.empty:
    st.info("No example of this run is flagged yet. Flag examples on the Test point page "
            "(checkbox column or “Flag all shown”) or on a Pretraining example page.")
else:
    rows = [eindex.get(e) for e in flags["example_id"]]
    known = [r for r in rows if r is not None]
    table = pd.DataFrame({
        "example": example_links(flags["example_id"].tolist()),
        "label": [label_name(names, int(run.pretrain_examples["label"].iloc[r]))
                  if r is not None else "?" for r in rows],
        "reason": flags["reason"], "note": flags["note"], "who": flags["user"],
        "when (UTC)": flags["flagged_at"],
        "from test point": [test_links([t])[0] if t else None for t in flags["test_id"]],
    })
    thumbs = thumbnails(run, known) if len(known) == len(rows) else None
    config = {
        "example": st.column_config.LinkColumn("example_id", display_text=r"example_id=(.*)$"),
        "from test point": st.column_config.LinkColumn("from test point",
                                                       display_text=r"test_id=(.*)$"),
    }
    if thumbs is not None:
        table.insert(0, "image", thumbs)
        config["image"] = st.column_config.ImageColumn("image", width=48)
    counts = flags["reason"].value_counts()
    st.markdown(f"**{len(flags)} flagged example{'s' if len(flags) != 1 else ''}** · "
                + " · ".join(f"{md_escape(r)}: {n}" for r, n in counts.items()))
    event = st.dataframe(table, hide_index=True, column_config=config, key="flags_table",
                         on_select="rerun", selection_mode="multi-row", row_height=40)
    # Selected row positions refer to the table the browser had; after another session
    # (un)flagged examples they may point past the end: keep only valid ones.
    try:
        rows_selected = list(event["selection"]["rows"]) if event else []
    except (KeyError, TypeError):
        rows_selected = []
    picked = [flags["example_id"].iloc[i] for i in rows_selected
              if isinstance(i, int) and 0 <= i < len(flags)]
    show_store_error()
    if st.button(f"Unflag {len(picked)} selected", key="unflag_selected", disabled=not picked):
        guarded_write(store.unflag, run.run_id, picked, session.user_name())
        st.rerun()
    with st.expander("History (every flag and unflag)"):
        st.dataframe(guarded_read(store.history, run.run_id), hide_index=True, key="flag_history")

st.subheader("Export")
test_id = str(st.session_state.get(session.TEST_KEY) or "").strip() or None
if test_id and test_id not in session.test_index(run.run_id, run):
    st.warning(f"Test point {md_code(test_id)} (from the URL or the sidebar) is not in run "
               f"{md_code(run.path.name)}, so the exports below have no score columns. Clear "
               "or correct the sidebar's test point id to add them.", icon=":material/warning:")
    test_id = None
st.caption("Score columns are for the current test point "
           + (f"{md_code(test_id)}." if test_id else "(none chosen: no score columns).")
           + " `ids.txt` lists the example ids of the rows; retrain without the flagged "
             "examples with `python -m engine run CONFIG --out NEW_RUN --exclude ids.txt` "
             "(from the flagged export).")
st.markdown("**Flagged examples**")
export_buttons(run, "flagged", key="export_flagged", test_id=test_id, n_rows=len(flags))
st.markdown("**Whole pretraining set minus the flagged examples**")
export_buttons(run, "minus-flagged", key="export_minus", test_id=test_id,
               n_rows=run.n_pretrain - len(flags))
