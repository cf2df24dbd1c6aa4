"""The strongest evidence at a glance, beside the test image: large thumbnails of the most
harmful and the most helpful pretraining examples of a test point (over all pretraining
examples, before any filter), with the score under each.

Each thumbnail is an ``st.image`` (fullscreen enlarge on hover) linked to the example's page;
the harmful strip comes first on a misclassified point, the helpful one on a correct point.
Runs with text payloads get a compact list instead; runs without payloads list the ids.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.evidence_data import (
    NOISE_LABEL,
    STRIP_SIZE,
    PointData,
    evidence_order,
    noise_flags,
    run_constants,
    strip_png,
    top_rows,
)
from dashboard.example_display import example_links
from dashboard.md_escape import md_code, md_escape
from dashboard.run_details import render_spec
from engine.artifacts import Run

_SIGN_MD = {"helpful": "blue", "harmful": "red"}


def strip_caption(example_id: str, label: str, total: float, noisy: bool) -> str:
    """Markdown under one thumbnail: id, label, the total in its sign colour, a noise mark."""
    colour = "blue" if total > 0 else "red"
    mark = "  \n:orange[:material/warning: noise?]" if noisy else ""
    return (f"{md_code(example_id)}  \nlabel {md_escape(label)}  \n:{colour}[**{total:+.2e}**]"
            f"{mark}")


def _strip(run: Run, rows: pd.DataFrame, threshold: float | None) -> None:
    noisy = (noise_flags(rows["pretrain_loss"], threshold) if "pretrain_loss" in rows.columns
             else [False] * len(rows))
    links = example_links(rows["example_id"].tolist(), run.path.name)
    kind = render_spec(run).kind
    if kind != "image":
        lines = []
        for (_, r), link, flag in zip(rows.iterrows(), links, noisy, strict=True):
            text = f" — {md_escape(str(r['text'])[:70])}" if "text" in rows.columns else ""
            lines.append(f"- [{md_escape(r['example_id'])}]({link}) · {md_escape(r['label_name'])}"
                         f" · :{'blue' if r['total'] > 0 else 'red'}[{r['total']:+.2e}]"
                         + (" · :orange[noise?]" if flag else "") + text)
        st.markdown("\n".join(lines))
        return
    cols = st.columns(STRIP_SIZE, gap="small")
    for col, (_, r), link, flag in zip(cols, rows.iterrows(), links, noisy, strict=False):
        png = strip_png(run, int(r["row"]))
        if png is None:
            continue
        col.image(png, caption=strip_caption(str(r["example_id"]), str(r["label_name"]),
                                             float(r["total"]), bool(flag)),
                  width="stretch", link=link)


def evidence_strips(run: Run, point: PointData, correct: bool) -> None:
    """The two strips (harmful first on a misclassified point), :data:`STRIP_SIZE` each."""
    threshold = run_constants(run).noise_threshold
    for sign in evidence_order(correct):
        rows = top_rows(point.frame, sign, STRIP_SIZE)
        what = "most harmful" if sign == "harmful" else "most helpful"
        effect = ("removing them is predicted to lower this test point's loss"
                  if sign == "harmful" else
                  "removing them is predicted to raise this test point's loss")
        st.markdown(f"**:{_SIGN_MD[sign]}[{len(rows)} {what}]** of all {run.n_pretrain:,} "
                    f"pretraining examples ({effect})",
                    help="Before any filter. Click a thumbnail to open the example; hover it "
                         "for the fullscreen button. "
                         + (f"*noise?*: {NOISE_LABEL} (pretraining loss in the top 5% of "
                            "this run)." if threshold is not None else ""))
        if rows.empty:
            st.caption(f"No {sign} examples for this test point.")
            continue
        _strip(run, rows, threshold)
