"""How examples and test points look on a page: image / text payloads, table thumbnails and
the column layout of example tables (with links to the example page)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import pandas as pd
import streamlit as st

from dashboard.run_details import render_spec
from dashboard.thumbnails import infer_shape, pixels_to_uint8, png_data_uri
from engine.artifacts import Run

EXAMPLE_PAGE_URL = "example"
TEST_PAGE_URL = "test-point"
SCORE_FORMAT = "%.3e"


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


def example_links(ids: Sequence[str]) -> list[str]:
    """Relative links to the example page of each id (open in a new tab); ids are URL-encoded,
    so ``&``, ``#``, ``%``, ``+`` or spaces in an id cannot change the link's target."""
    return [f"{EXAMPLE_PAGE_URL}?example_id={quote(str(e), safe='')}" for e in ids]


def test_links(ids: Sequence[str]) -> list[str]:
    """Relative links to the test point page of each id (open in a new tab), URL-encoded."""
    return [f"{TEST_PAGE_URL}?test_id={quote(str(t), safe='')}" for t in ids]


def example_table_view(run: Run, frame: pd.DataFrame, score_columns: Sequence[str],
                       extra_columns: Sequence[str] = ()) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A display frame (thumbnail, id link, label, scores, then ``extra_columns``) and its
    column config; score columns get a scientific number format.

    ``frame`` rows come from :mod:`dashboard.filters` frames (they carry ``row``).
    """
    view = pd.DataFrame(index=range(len(frame)))
    config: dict[str, Any] = {}
    thumbs = thumbnails(run, frame["row"].tolist())
    if thumbs is not None:
        view["image"] = thumbs
        config["image"] = st.column_config.ImageColumn("image", width=48)
    elif "text" in frame.columns:
        view["text"] = frame["text"].str.slice(0, 80).to_numpy()
        config["text"] = st.column_config.TextColumn("text", width="medium")
    view["example"] = example_links(frame["example_id"].tolist())
    config["example"] = st.column_config.LinkColumn(
        "example_id", display_text=r"example_id=(.*)$", width="small",
        help="Open the pretraining example page in a new tab")
    view["label"] = frame["label_name"].to_numpy()
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
