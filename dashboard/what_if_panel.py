"""Streamlit side of the what-if: the first-order prediction of removing the flagged examples,
on the Flags page (every scored test point) and beside one test point (see
:mod:`dashboard.what_if` for the arithmetic)."""

from __future__ import annotations

import hashlib
from collections.abc import Collection

import pandas as pd
import streamlit as st

from dashboard.example_display import test_links
from dashboard.md_escape import md_code
from dashboard.what_if import (
    FIRST_ORDER_LABEL,
    WhatIf,
    point_outcome,
    point_prediction,
    what_if,
)
from engine.artifacts import Run

MAX_LISTED = 30


def _digest(ids: Collection[str]) -> str:
    return hashlib.sha1("\n".join(sorted(map(str, ids))).encode()).hexdigest()


@st.cache_resource(max_entries=16, show_spinner=False)
def _cached(run_id: str, ids_digest: str, _run: Run, _ids: tuple[str, ...]) -> WhatIf:
    """Keyed by the run and a digest of the id set (never by array contents)."""
    return what_if(_run, _ids)


def cached_what_if(run: Run, example_ids: Collection[str]) -> WhatIf:
    """:func:`dashboard.what_if.what_if`, cached per (run, set of ids)."""
    ids = tuple(sorted(map(str, example_ids)))
    return _cached(run.run_id, _digest(ids), run, ids)


def _measure_name(run: Run) -> str:
    return str(run.manifest.get("measurement") or "loss")


def point_what_if(run: Run, flagged_ids: Collection[str], test_id: str) -> None:
    """One line for one test point: its measurement now, the predicted change and the predicted
    measurement if the flagged examples are removed, and whether it would flip."""
    if not flagged_ids:
        st.caption(":material/lightbulb: Flag examples to see the predicted effect of removing "
                   "them on this test point (first order, from the scores).")
        return
    rows = run.test_points.index[run.test_points["test_id"].astype(str) == str(test_id)]
    if len(rows) == 0:
        return
    position = int(run.test_points.index.get_loc(rows[0]))
    row = point_prediction(run, flagged_ids, position)
    outcome = point_outcome(run, bool(run.test_points["correct"].iloc[position]),
                            row["predicted_after"])
    n_removed = int(row["n_removed"])
    name = _measure_name(run)
    verdict = {"predicted fix": ":green-badge[predicted to become correct]",
               "predicted break": ":red-badge[predicted to become misclassified]",
               "undetermined": ":gray-badge[cannot tell whether it flips]"}.get(outcome, "")
    st.markdown(
        f"**If the {n_removed} flagged examples are removed:** {name} "
        f"{row['measurement']:.3f} → **{row['predicted_after']:.3f}** (predicted change "
        f"{row['predicted_change']:+.3f} = pretrained-model term {row['pretrained_term']:+.3f}"
        f" + finetuned-model term {row['finetuned_term']:+.3f}) {verdict}",
        help=f"A {FIRST_ORDER_LABEL}. Retrain without the flagged examples (Flags page) to see "
             "the actual change on the Compare runs page.")


def what_if_summary(run: Run, flagged_ids: Collection[str], key: str = "what_if") -> WhatIf | None:
    """The Flags page block: predicted fixes and breaks over every scored test point, and the
    table of predicted changes (largest decrease first).  Returns the prediction."""
    st.subheader("What if the flagged examples are removed?")
    if not flagged_ids:
        st.info("Nothing is flagged yet, so there is nothing to predict.")
        return None
    result = cached_what_if(run, flagged_ids)
    frame = result.frame
    name = _measure_name(run)
    mis = frame[~frame["correct"]]
    lo, hi = result.thresholds
    st.caption(f"A {FIRST_ORDER_LABEL}: each test point's predicted change of its {name} is "
               f"the sum of the scores of the {result.n_removed} flagged examples. A "
               f"misclassified point counts as fixed when its predicted {name} falls below "
               f"{lo:.4g}, a correct one as broken when it rises above {hi:.4g}"
               + (" (exact for this run's measurement and classes)." if lo == hi else
                  " (sufficient conditions; points in between are undetermined).")
               + (f" {result.n_unknown} flagged ids are not examples of this run and are "
                  "ignored." if result.n_unknown else ""))
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("flagged examples in this run", f"{result.n_removed:,}")
    c2.metric("misclassified → predicted fixed", f"{len(result.fixes)} of {len(mis)}")
    c3.metric("correct → predicted broken", f"{len(result.breaks)}")
    c4.metric(f"mean predicted change on misclassified ({name})",
              f"{mis['predicted_change'].mean():+.3f}" if len(mis) else "–")
    for title, ids in (("Predicted fixed", result.fixes), ("Predicted broken", result.breaks)):
        if ids:
            shown = ", ".join(md_code(t) for t in ids[:MAX_LISTED])
            more = f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else ""
            st.markdown(f"**{title} ({len(ids)}):** {shown}{more}")
    table = frame.sort_values("predicted_change", kind="stable").reset_index(drop=True)
    view = pd.DataFrame({
        "test point": test_links(table["test_id"].tolist(), run.path.name),
        "now": table["correct"].map({True: "correct", False: "misclassified"}),
        f"{name} now": table["measurement"], "predicted change": table["predicted_change"],
        f"predicted {name}": table["predicted_after"], "outcome": table["outcome"],
    })
    st.dataframe(view, hide_index=True, key=f"{key}_table", height=320, column_config={
        "test point": st.column_config.LinkColumn("test point", display_text=r"test_id=(.*)$"),
        "predicted change": st.column_config.NumberColumn(format="%+.4f"),
        f"{name} now": st.column_config.NumberColumn(format="%.4f"),
        f"predicted {name}": st.column_config.NumberColumn(format="%.4f"),
    })
    return result
