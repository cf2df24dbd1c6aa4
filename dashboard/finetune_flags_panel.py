"""The Flags page's section for flagged FINETUNING examples (``finetune_flags.sqlite``): the
list, unflagging by id, the first-order what-if of removing them (finetuning stage retrained)
and their ids file for ``python -m engine run --exclude-finetune``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import session
from dashboard.flag_controls import guarded_read, guarded_write
from dashboard.flags import FlagStore
from dashboard.md_escape import md_code
from dashboard.run_details import class_names, label_name
from dashboard.what_if import FIRST_ORDER_LABEL, finetune_removal_prediction, flip_thresholds
from engine.artifacts import Run
from engine.ids_file import ids_text

PICK_KEY = "ft_flags_pick_ids"
IDS_FILE = "flagged_finetune_ids.txt"


def _unflag(run_id: str, picked: tuple[str, ...], store_path: str) -> None:
    store = FlagStore(store_path)
    if guarded_write(store.unflag, run_id, list(picked), session.user_name()):
        st.session_state[PICK_KEY] = []


def predicted_fixes(run: Run, flagged: list[str]) -> tuple[np.ndarray, int, int]:
    """``(predicted change per test point, misclassified predicted fixed, correct predicted
    broken)`` if the flagged finetuning examples are removed (sum of their scores)."""
    change = finetune_removal_prediction(run, flagged)
    tp = run.test_points
    before = tp["measurement" if "measurement" in tp else "loss"].to_numpy(dtype=float)
    after = before + change
    lo, hi = flip_thresholds(run)
    correct = tp["correct"].to_numpy(dtype=bool)
    return change, int((~correct & (after < lo)).sum()), int((correct & (after > hi)).sum())


def finetune_flags_panel(run: Run) -> list[str]:
    """Render the section; returns the flagged finetuning example ids (for the retrain)."""
    store = session.flag_store(run, "finetune")
    flags = guarded_read(store.flags, run.run_id)
    ids = flags["example_id"].astype(str).tolist()
    st.subheader("Flagged finetuning examples")
    if run.finetune_examples is None:
        st.caption("This run has no finetuning-data influence, so its finetuning examples "
                   "cannot be flagged here.")
        return []
    if flags.empty:
        st.caption("None yet: flag them in *Finetuning examples* on the Test point page "
                   f"(stored in {md_code(store.path)}).")
        return []
    ex = run.finetune_examples
    index = {e: i for i, e in enumerate(ex["example_id"].astype(str))}
    names = class_names(run, "finetune")
    st.dataframe(pd.DataFrame({
        "example_id": ids,
        "label": [label_name(names, int(ex["label"].iloc[index[e]])) if e in index else "?"
                  for e in ids],
        "reason": flags["reason"], "who": flags["user"], "when (UTC)": flags["flagged_at"],
        "from test point": flags["test_id"]}), hide_index=True, key="ft_flags_table")
    change, fixed, broken = predicted_fixes(run, ids)
    n_mis = int((~run.test_points["correct"].to_numpy(dtype=bool)).sum())
    st.markdown(f"Removing these **{len(ids)}** finetuning examples: misclassified → predicted "
                f"fixed **{fixed} of {n_mis}**, correct → predicted broken **{broken}**, mean "
                f"predicted change {float(np.mean(change)):+.4f} ({FIRST_ORDER_LABEL}; the "
                "finetuning stage retrained).")
    picked = st.multiselect("Selected flagged finetuning examples", ids, key=PICK_KEY,
                            placeholder="none selected")
    st.button(f"Unflag {len(picked)} selected finetuning examples", key="ft_unflag",
              disabled=not picked, on_click=_unflag,
              args=(run.run_id, tuple(picked), str(store.path)))
    st.download_button(f"Download {IDS_FILE}", ids_text(ids), file_name=IDS_FILE,
                       key="ft_ids_download", on_click="ignore",
                       help="For `python -m engine run CONFIG --out NEW_RUN --exclude-finetune "
                            f"{IDS_FILE}`")
    return ids
