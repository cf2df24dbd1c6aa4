"""The finetuning-data section of the Test point page: which FINETUNING examples helped or hurt
this test point, beside the pretraining evidence above it.

One ``st.fragment``: the verdict line (pretraining vs finetuning data, :mod:`engine.stage_verdict`),
the first-order what-if of removing the flagged finetuning examples, the run's map with the
finetuning examples coloured by their score, and the ranked tables with flag checkboxes that
write to the finetuning flag store (``finetune_flags.sqlite`` beside the run; see
:mod:`dashboard.flags`).  Scores follow the one convention: the predicted change of this test
point's loss if the example is removed and the finetuning stage is retrained (> 0 helpful,
< 0 harmful); the tables need no term split (one stage).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import session
from dashboard.convention import HARMFUL_COLOR, HELPFUL_COLOR
from dashboard.evidence_data import axis_range, evidence_order, point_data, robust_bound
from dashboard.example_display import SCORE_FORMAT, heat_style
from dashboard.flag_controls import flag_editor, guarded_read
from dashboard.map_chart import MapScales, finetune_map
from dashboard.md_escape import md_code
from dashboard.run_details import class_names, label_name, render_spec
from dashboard.thumbnails import infer_shape, png_data_uri
from dashboard.what_if import FIRST_ORDER_LABEL, finetune_columns
from engine.artifacts import Run
from engine.stage_verdict import DEFAULT_K, StageVerdict, stage_verdict

TOPK_KEY = "ft_topk"
SCORE_HELP = ("Predicted change of this test point's loss if this finetuning example is "
              "removed and the finetuning stage is retrained (Koh & Liang on the finetuning "
              "objective): > 0 helpful, < 0 harmful.")


@dataclass(frozen=True)
class FinetunePoint:
    """One test point's finetuning-data scores: ``frame`` (one row per finetuning example:
    ``row``, ``example_id``, ``label_name``, ``score``, ``finetune_loss``, ``correct``,
    ``map_x`` / ``map_y`` when stored), sorted by score, and the verdict."""

    frame: pd.DataFrame
    verdict: StageVerdict
    bound: float


def finetune_point(run: Run, row: int, k: int = DEFAULT_K) -> FinetunePoint | None:
    """The finetuning-data scores and verdict of score row ``row``; ``None`` when the run has
    no finetuning-data influence."""
    if run.finetune_scores is None or run.finetune_examples is None:
        return None
    ex = run.finetune_examples
    scores = np.asarray(run.finetune_scores[int(row)], dtype=np.float64)
    names = class_names(run, "finetune")
    frame = pd.DataFrame({
        "row": np.arange(len(ex)), "example_id": ex["example_id"].astype(str).to_numpy(),
        "label_name": [label_name(names, int(v)) for v in ex["label"]],
        "score": scores})
    for col in ("finetune_loss", "correct", "map_x", "map_y"):
        if col in ex.columns:
            frame[col] = ex[col].to_numpy()
    pre_row = point_data(run, int(row)).frame["total"].to_numpy(dtype=np.float64)
    verdict = stage_verdict(pre_row, scores, k)
    bound = robust_bound(scores) or float(np.abs(scores).max(initial=0.0)) or 1.0
    return FinetunePoint(frame.sort_values("score", kind="stable"), verdict, bound)


def _thumbs(run: Run, rows: list[int]) -> list[str] | None:
    render = render_spec(run)
    ex = run.finetune_examples
    if render.kind != "image" or ex is None or render.column not in ex.columns:
        return None
    out = []
    for r in rows:
        pixels = ex[render.column].iloc[int(r)]
        out.append(png_data_uri(pixels, render.shape or infer_shape(pixels), scale=4))
    return out


def _table_view(run: Run, part: pd.DataFrame, sign: str, bound: float
                ) -> tuple[pd.DataFrame, dict, object]:
    view = pd.DataFrame(index=range(len(part)))
    config: dict = {}
    thumbs = _thumbs(run, part["row"].tolist())
    ex = run.finetune_examples
    if thumbs is not None:
        view["image"] = thumbs
        config["image"] = st.column_config.ImageColumn("image", width=48)
    elif ex is not None and "text" in ex.columns:
        view["text"] = ex["text"].astype(str).str.slice(0, 80).to_numpy()[part["row"]]
        config["text"] = st.column_config.TextColumn("text", width="medium")
    view["example_id"] = part["example_id"].to_numpy()
    view["label"] = part["label_name"].to_numpy()
    view["|score|"] = np.abs(part["score"].to_numpy())
    config["|score|"] = st.column_config.ProgressColumn(
        "|score|", min_value=0.0, max_value=float(np.abs(part["score"]).max()) or 1.0,
        format=" ", width=110, color=HELPFUL_COLOR if sign == "helpful" else HARMFUL_COLOR)
    view["score"] = part["score"].to_numpy()
    config["score"] = st.column_config.NumberColumn("score", format=SCORE_FORMAT, width=100,
                                                    help=SCORE_HELP)
    if "finetune_loss" in part.columns:
        view["finetune_loss"] = part["finetune_loss"].to_numpy()
        config["finetune_loss"] = st.column_config.NumberColumn(
            "finetune_loss", format="%.3f",
            help="Loss of the example's own label under the finetuned model")

    def style(table: pd.DataFrame) -> object:
        return table.style.map(lambda v: heat_style(v, bound), subset=["score"])

    return view, config, style


def _body(run: Run, test_id: str, row: int, correct: bool) -> None:
    st.subheader("Finetuning examples")
    if run.finetune_scores is None:
        st.caption("This run has no finetuning-data influence (`[influence] finetune_influence "
                   "= false`); re-run it with the default to see which finetuning examples "
                   "helped or hurt this point.")
        return
    k = int(st.number_input("Examples per table", 1, 200, value=DEFAULT_K, key=TOPK_KEY))
    point = finetune_point(run, row)
    assert point is not None
    st.markdown(f"**Where the error comes from** ({'correct' if correct else 'misclassified'} "
                f"point): {point.verdict.sentence()}",
                help=f"Sum of the {point.verdict.k} most negative scores of each pool: a "
                     f"{FIRST_ORDER_LABEL}. Pretraining scores assume both stages are "
                     "retrained, finetuning scores the finetuning stage only.")
    store = session.flag_store(run, "finetune")
    flagged = guarded_read(store.flagged_ids, run.run_id)
    frame = point.frame.assign(flagged=point.frame["example_id"].isin(list(flagged)))
    cols = finetune_columns(run, flagged)
    if len(cols):
        change = float(point.frame.set_index("row").loc[cols, "score"].sum())
        st.markdown(f"Removing the **{len(cols)} flagged finetuning examples** is predicted to "
                    f"change this point's loss by **{change:+.4f}** ({FIRST_ORDER_LABEL}).")
    if {"map_x", "map_y"} <= set(frame.columns):
        consts_pre = np.asarray(run.pretrain_xy, dtype=float).reshape(-1, 2)
        xr = axis_range(consts_pre[:, 0], frame["map_x"].to_numpy(dtype=float))
        yr = axis_range(consts_pre[:, 1], frame["map_y"].to_numpy(dtype=float))
        scales = MapScales(xr, yr, point.bound, None, class_names(run, "finetune"))
        test_xy = tuple(float(v) for v in run.test_xy[row])
        st.plotly_chart(finetune_map(frame, run.pretrain_xy, test_xy, test_id, scales,
                                     point.bound),
                        key=f"ftmap_{run.run_id}_{test_id}", config={"displaylogo": False})
    parts = {"harmful": frame[frame["score"] < 0].head(k),
             "helpful": frame[frame["score"] > 0].iloc[::-1].head(k)}
    for sign in evidence_order(correct):
        part = parts[sign]
        n_all = int((frame["score"] < 0).sum() if sign == "harmful" else
                    (frame["score"] > 0).sum())
        st.markdown(f"#### Most {sign} finetuning examples ({n_all:,})")
        if part.empty:
            st.caption("None.")
            continue
        display, config, style = _table_view(run, part, sign, point.bound)
        flag_editor(run, part, display, config, key=f"ft_tbl_{sign}_{test_id}",
                    test_id=test_id, height=min(40 * len(part) + 40, 520), style=style,
                    stage="finetune")
    st.caption(f"Flags of finetuning examples are stored in {md_code(store.path)}; the Flags "
               "page lists them and retrains without them (`--exclude-finetune`).")


def finetune_body(run: Run, test_id: str, row: int, correct: bool) -> None:
    """Render the finetuning-data section of test point ``test_id`` (score row ``row``);
    errors of the run files or the flag store become one message."""
    try:
        _body(run, test_id, row, correct)
    except session.PAGE_ERRORS as exc:
        session.show_page_error(exc)


#: :func:`finetune_body` as a fragment: its widgets rerun only this section.
finetune_section = st.fragment(finetune_body)
