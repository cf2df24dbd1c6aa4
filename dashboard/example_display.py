"""How examples and test points look on a page: image / text payloads, table thumbnails and
the column layout of example tables (with links to the example page)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import pandas as pd
import streamlit as st

from dashboard.convention import HARMFUL_COLOR, HELPFUL_COLOR, SCORE_COLUMNS
from dashboard.evidence_data import (
    NOISE_LABEL,
    NOISE_TOP_FRACTION,
    noise_flags,
    table_thumbnails,
)
from dashboard.run_details import render_spec
from dashboard.terms import TERM_HELP
from dashboard.thumbnails import infer_shape, pixels_to_uint8, png_data_uri
from engine.artifacts import Run

EXAMPLE_PAGE_URL = "example"
TEST_PAGE_URL = "test-point"
SCORE_FORMAT = "%.3e"
BAR_COLUMN = "|total|"
#: Tables longer than this get no cell shading (pandas Styler costs ~0.15 s per 1,000 rows).
SHADE_MAX_ROWS = 100
NOISE_COLUMN = "label noise?"


def show_payload(run: Run, table: pd.DataFrame, row: int, width: int = 160) -> None:
    """Show the image or text of row ``row`` of ``table`` (the test or pretraining table)."""
    render = render_spec(run)
    if render.kind == "image" and render.column in table.columns:
        pixels = table[render.column].iloc[row]
        shape = render.shape or infer_shape(pixels)
        scale = max(1, width // max(shape))
        st.image(pixels_to_uint8(pixels, shape, scale=scale), width=width, clamp=True)
    elif render.kind == "text" and render.column in table.columns:
        st.code(str(table[render.column].iloc[row]), language=None, wrap_lines=True)
    else:
        st.caption("This run stores no image or text for its examples.")


def thumbnails(run: Run, rows: Sequence[int]) -> list[str] | None:
    """Data-URI PNG thumbnails of pretraining rows, or ``None`` when the run has no images."""
    render = render_spec(run)
    if render.kind != "image":
        return None
    column = run.pretrain_examples[render.column]
    out = []
    for r in rows:
        pixels = column.iloc[int(r)]
        out.append(png_data_uri(pixels, render.shape or infer_shape(pixels), scale=4))
    return out


def _run_param(run_name: str | None) -> str:
    # The run goes first so that display patterns ending in "<key>=(.*)$" still see the id.
    return f"run={quote(str(run_name), safe='')}&" if run_name else ""


def example_links(ids: Sequence[str], run_name: str | None = None) -> list[str]:
    """Relative links to the example page of each id (open in a new tab); ids are URL-encoded,
    so ``&``, ``#``, ``%``, ``+`` or spaces in an id cannot change the link's target.  With
    ``run_name`` the link also names the run (a new tab otherwise opens the default run)."""
    prefix = _run_param(run_name)
    return [f"{EXAMPLE_PAGE_URL}?{prefix}example_id={quote(str(e), safe='')}" for e in ids]


def test_links(ids: Sequence[str], run_name: str | None = None) -> list[str]:
    """Relative links to the test point page of each id (open in a new tab), URL-encoded;
    ``run_name`` as for :func:`example_links`."""
    prefix = _run_param(run_name)
    return [f"{TEST_PAGE_URL}?{prefix}test_id={quote(str(t), safe='')}" for t in ids]


def _identity_columns(run: Run, frame: pd.DataFrame, thumbs: list[str] | None
                      ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The leading columns every example table shares: thumbnail (or text), id link, label."""
    view = pd.DataFrame(index=range(len(frame)))
    config: dict[str, Any] = {}
    if thumbs is not None:
        view["image"] = thumbs
        config["image"] = st.column_config.ImageColumn("image", width=48)
    elif "text" in frame.columns:
        view["text"] = frame["text"].str.slice(0, 80).to_numpy()
        config["text"] = st.column_config.TextColumn("text", width="medium")
    view["example"] = example_links(frame["example_id"].tolist(), run.path.name)
    config["example"] = st.column_config.LinkColumn(
        "example_id", display_text=r"example_id=(.*)$", width="small",
        help="Open the pretraining example page in a new tab")
    view["label"] = frame["label_name"].to_numpy()
    return view, config


def example_table_view(run: Run, frame: pd.DataFrame, score_columns: Sequence[str],
                       extra_columns: Sequence[str] = ()) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A display frame (thumbnail, id link, label, scores, then ``extra_columns``) and its
    column config; score columns get a scientific number format.

    ``frame`` rows come from :mod:`dashboard.filters` frames (they carry ``row``).
    """
    view, config = _identity_columns(run, frame, thumbnails(run, frame["row"].tolist()))
    for col in score_columns:
        view[col] = frame[col].to_numpy()
        config[col] = st.column_config.NumberColumn(col, format=SCORE_FORMAT, width="small")
    for col in extra_columns:
        if col in frame.columns:
            view[col] = frame[col].to_numpy()
    if "pretrain_loss" in view.columns:
        config["pretrain_loss"] = st.column_config.NumberColumn(
            "pretrain_loss", format="%.3f", help="Loss of the example under the pretrained model")
    return view, config


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha:.2f})"


def heat_style(value: float, bound: float) -> str:
    """CSS of one score cell: background in its sign colour, stronger with ``|value|/bound``
    (``bound`` comes from the whole score row, so shading does not change while filtering).
    Streamlit tables render ``background-color`` (not Styler's gradient bars)."""
    if not value or not bound or value != value:
        return ""
    strength = min(abs(float(value)) / bound, 1.0)
    color = HELPFUL_COLOR if value > 0 else HARMFUL_COLOR
    return f"background-color: {_rgba(color, 0.08 + 0.5 * strength)}"


def evidence_table_view(
    run: Run, frame: pd.DataFrame, sign: str, total_max: float, cell_bound: float,
    noise_threshold: float | None, extra_columns: Sequence[str] = (),
) -> tuple[pd.DataFrame, dict[str, Any], Callable[[pd.DataFrame], Any] | None]:
    """Display frame, column config and cell styling of one ranked table of the test point
    page (``sign`` "helpful" or "harmful": the sign of every row's total).

    Columns: thumbnail (or text), id link, label, a bar of ``|total|`` (full length =
    ``total_max``, the largest ``|total|`` for this test point) in the table's sign colour,
    the three signed scores in scientific format on cells shaded by sign and size,
    ``pretrain_loss`` with a "possible label noise" marker for the top
    :data:`~dashboard.evidence_data.NOISE_TOP_FRACTION` of the run, then ``extra_columns``.
    The styling callable turns the (editor's) frame into a pandas Styler; it is ``None`` for
    tables over :data:`SHADE_MAX_ROWS` rows (the bars and numbers stay).
    """
    view, config = _identity_columns(run, frame, table_thumbnails(run, frame["row"].tolist()))
    total = frame["total"].to_numpy(dtype=float)
    view[BAR_COLUMN] = abs(total)
    config[BAR_COLUMN] = st.column_config.ProgressColumn(
        BAR_COLUMN, min_value=0.0, max_value=float(total_max) or 1.0, format=" ", width=110,
        color=HELPFUL_COLOR if sign == "helpful" else HARMFUL_COLOR,
        help=f"|total| as a bar; full length = the largest |total| for this test point "
             f"({total_max:.3e}), whatever the filters.")
    for col in SCORE_COLUMNS:
        view[col] = frame[col].to_numpy()
        config[col] = st.column_config.NumberColumn(col, format=SCORE_FORMAT, width=100,
                                                    help=TERM_HELP.get(col))
    if "pretrain_loss" in frame.columns:
        loss = frame["pretrain_loss"].to_numpy(dtype=float)
        view["pretrain_loss"] = loss
        view[NOISE_COLUMN] = [NOISE_LABEL if v else "" for v in noise_flags(loss,
                                                                           noise_threshold)]
        config["pretrain_loss"] = st.column_config.NumberColumn(
            "pretrain_loss", format="%.3f", width=95,
            help="Loss of the example's own (pretraining) label under the pretrained model.")
        config[NOISE_COLUMN] = st.column_config.TextColumn(
            NOISE_COLUMN, width=150, help=noise_help(noise_threshold))
    for col in extra_columns:
        if col in frame.columns and col not in view.columns:
            view[col] = frame[col].to_numpy()

    def style(table: pd.DataFrame) -> Any:
        cols = [c for c in SCORE_COLUMNS if c in table.columns]
        return table.style.map(lambda v: heat_style(v, cell_bound), subset=cols)

    return view, config, (style if len(frame) <= SHADE_MAX_ROWS else None)


def noise_help(threshold: float | None) -> str:
    """Tooltip of the label-noise marker: which threshold, and what it means."""
    if threshold is None:
        return "This run has no pretraining losses."
    return (f"Marked when the pretraining loss is in the top {NOISE_TOP_FRACTION:.0%} of this "
            f"run's pretraining examples (at or above its "
            f"{1 - NOISE_TOP_FRACTION:.0%} percentile, {threshold:.3f}): the pretrained model "
            "fits the example's own label poorly, as it typically does for a mislabelled example. "
            "A signal to look at the example, not a verdict (hard or unusual examples are "
            "marked too).")
