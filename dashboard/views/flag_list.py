"""Every flag of the run (who / when / why / from which test point), unflagging, and exports of
the flagged set and of the pretraining set minus the flagged examples; flagged finetuning
examples in their own section (:mod:`dashboard.finetune_flags_panel`), included in the retrain."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import flag_selection, session
from dashboard.example_display import example_links, test_links, thumbnails
from dashboard.export_panel import export_buttons
from dashboard.finetune_flags_panel import finetune_flags_panel
from dashboard.flag_controls import guarded_read, guarded_write, show_store_error
from dashboard.md_escape import md_code, md_escape
from dashboard.retrain_panel import retrain_panel
from dashboard.run_details import class_names, label_name
from dashboard.what_if_panel import what_if_summary

_DONE_KEY = "_flags_unflag_done"

run = session.current_run()
store = session.flag_store(run)
eindex = session.example_index(run.run_id, run)
names = class_names(run, "pretrain")

st.title("Flags")
st.caption(f"Stored in {md_code(store.path)} (beside the run; the run directory stays "
           f"read-only), keyed by run_id {md_code(run.run_id)} and example_id.")

flags = guarded_read(store.flags, run.run_id)
flagged_now = flags["example_id"].astype(str).tolist()


def _from_test_point(test_id: object) -> str | None:
    """Link to the test point a flag was made from; flags made elsewhere (the example page,
    the command line) have none: NULL in the store, NaN / None in the frame."""
    if test_id is None or (isinstance(test_id, float) and pd.isna(test_id)):
        return None
    text = str(test_id).strip()
    return test_links([text], run.path.name)[0] if text else None


def _unflag(store, run_id: str, picked: tuple[str, ...]) -> None:
    """Unflag exactly ``picked`` (ids, not rows); ids unflagged elsewhere meanwhile are
    reported, not mistaken for others."""
    still = set(guarded_read(store.flagged_ids, run_id))
    gone = [e for e in picked if e not in still]
    if guarded_write(store.unflag, run_id, [e for e in picked if e in still],
                     session.user_name()):
        st.session_state[flag_selection.PICK_KEY] = []
        st.session_state[_DONE_KEY] = (
            f"Unflagged {len(picked) - len(gone)} example(s)"
            + (f"; {len(gone)} had already been unflagged elsewhere" if gone else ""))


if flags.empty:
    st.info("No example of this run is flagged yet. Flag examples on the Test point page "
            "(checkbox column or “Flag all shown”) or on a Pretraining example page.")
else:
    rows = [eindex.get(e) for e in flags["example_id"]]
    known = [r for r in rows if r is not None]
    table = pd.DataFrame({
        "example": example_links(flags["example_id"].tolist(), run.path.name),
        "label": [label_name(names, int(run.pretrain_examples["label"].iloc[r]))
                  if r is not None else "?" for r in rows],
        "reason": flags["reason"], "note": flags["note"], "who": flags["user"],
        "when (UTC)": flags["flagged_at"],
        "from test point": [_from_test_point(t) for t in flags["test_id"]],
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
    # Selection by example id: see dashboard/flag_selection.py for why never by position.
    key = flag_selection.prepare(flagged_now)
    st.dataframe(table, hide_index=True, column_config=config, key=key,
                 on_select="rerun", selection_mode="multi-row", row_height=40)
    st.multiselect("Selected flagged examples (by id; rows ticked above are added)",
                   flagged_now, key=flag_selection.PICK_KEY, placeholder="none selected")
    picked = flag_selection.selected(flagged_now, key)
    show_store_error()
    st.button(f"Unflag {len(picked)} selected", key="unflag_selected", disabled=not picked,
              help="Unflags exactly the example ids listed as selected.", on_click=_unflag,
              args=(store, run.run_id, tuple(picked)))
    if st.session_state.get(_DONE_KEY):
        st.success(st.session_state.pop(_DONE_KEY), icon=":material/check:")
    with st.expander("History (every flag and unflag)"):
        st.dataframe(guarded_read(store.history, run.run_id), hide_index=True, key="flag_history")

what_if_summary(run, flagged_now)
flagged_finetune = finetune_flags_panel(run)

st.subheader("Retrain without the flagged examples")
retrain_panel(run, flagged_now, session.runs_dir(), user=session.user_name(),
              flagged_finetune_ids=flagged_finetune)

st.subheader("Export")
test_id = str(st.session_state.get(session.TEST_KEY) or "").strip() or None
if test_id and test_id not in session.test_index(run.run_id, run):
    st.warning(f"Test point {md_code(test_id)} (from the URL or the sidebar) is not in run "
               f"{md_code(run.path.name)}, so the exports below have no score columns. Clear "
               "or correct the sidebar's test point id to add them.", icon=":material/warning:")
    test_id = None
st.caption("Score columns are for the current test point "
           + (f"{md_code(test_id)}." if test_id else "(none chosen: no score columns).")
           + " Each zip names its ids file by what it lists (`flagged_ids.txt`, "
             "`kept_ids.txt`) and carries the pretraining file's feature columns, so the "
             "minus-flagged file is a dataset you can train on. By hand: `python -m engine run "
             "CONFIG --out NEW_RUN --exclude flagged_ids.txt`.")
st.markdown("**Flagged examples**")
export_buttons(run, "flagged", key="export_flagged", test_id=test_id, n_rows=len(flags))
st.markdown("**Whole pretraining set minus the flagged examples**")
export_buttons(run, "minus-flagged", key="export_minus", test_id=test_id,
               n_rows=run.n_pretrain - len(flags))
