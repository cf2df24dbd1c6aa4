"""The one legend every page shows: the score convention and its two colours."""

from __future__ import annotations

import html

import streamlit as st

from dashboard.convention import HARMFUL_COLOR, HELPFUL_COLOR, SCORE_CONVENTION


def _swatch(color: str) -> str:
    return (f"<span style='display:inline-block;width:0.9em;height:0.9em;background:{color};"
            "border-radius:2px;vertical-align:middle;margin:0 0.25em'></span>")


def show() -> None:
    """Caption with the convention, verbatim, and the helpful / harmful colours."""
    st.markdown(
        f"<div class='influence-legend' style='font-size:0.85rem;color:#444;"
        f"border-left:3px solid #ccc;padding:0.2rem 0.6rem;margin-bottom:0.6rem'>"
        f"{_swatch(HELPFUL_COLOR)}<b>helpful</b> (score &gt; 0) "
        f"{_swatch(HARMFUL_COLOR)}<b>harmful</b> (score &lt; 0) &nbsp;·&nbsp; "
        f"{html.escape(SCORE_CONVENTION)}</div>",
        unsafe_allow_html=True)
