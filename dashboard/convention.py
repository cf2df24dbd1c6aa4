"""The score convention and the two colours that encode its sign, shared by every page and export.

Kept in one place so the legend, the charts and the exported manifests can never disagree.
"""

from __future__ import annotations

# Re-exported: the engine owns the wording, the dashboard owns the colours.
from engine.convention import SCORE_CONVENTION as SCORE_CONVENTION

#: Colour of positive (helpful) scores everywhere in the dashboard.
HELPFUL_COLOR = "#2166ac"
#: Colour of negative (harmful) scores everywhere in the dashboard.
HARMFUL_COLOR = "#d6604d"
#: Colour of zero on the diverging scale.
NEUTRAL_COLOR = "#f7f7f7"

#: Plotly diverging colour scale: harmful (negative) -> neutral (0) -> helpful (positive).
#: Use it with ``cmid=0`` so zero always maps to the neutral middle.
DIVERGING_SCALE = [[0.0, HARMFUL_COLOR], [0.5, NEUTRAL_COLOR], [1.0, HELPFUL_COLOR]]

SCORE_COLUMNS = ("total", "pretrained_term", "finetuned_term")


def sign_color(value: float) -> str:
    """Colour for one score: helpful colour when positive, harmful colour otherwise."""
    return HELPFUL_COLOR if value > 0 else HARMFUL_COLOR


def sign_word(value: float) -> str:
    """``"helpful"`` for a positive score, ``"harmful"`` for a negative one, else ``"neutral"``."""
    if value > 0:
        return "helpful"
    if value < 0:
        return "harmful"
    return "neutral"
