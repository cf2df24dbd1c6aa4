"""What the Test point page computes once per run and once per (run, test point), cached, and
the small pure helpers around it (no widgets here).

Every rerun of the evidence section (a filter change, a flag edit, a map colour change) starts
from :func:`point_data`: the score frame of one test point **sorted by total, most helpful
first** (so :func:`~dashboard.filters.apply_filters` finds it already in view order), the colour
and bar bounds taken from the **whole** score row (they stay fixed while filtering) and the
map's background sample.  Run-wide constants (map axis ranges, the label-noise threshold of the
pretraining loss) come from :func:`run_constants`.  Caches are ``st.cache_resource`` entries
keyed by the run id and the test row, never by array contents; cached frames are shared and
must never be mutated (``with_flags`` returns a new frame).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import session
from dashboard.filters import sample_positions, score_frame
from dashboard.run_details import group_columns, render_spec
from dashboard.thumbnails import infer_shape, pixels_to_uint8, png_bytes, png_data_uri
from engine.artifacts import Run

#: Fraction of the pretraining examples with the highest pretraining loss marked
#: "possible label noise".
NOISE_TOP_FRACTION = 0.05
NOISE_LABEL = "possible label noise"
#: Thumbnails per strip beside the test image.
STRIP_SIZE = 8
STRIP_PX = 96
MAP_TOP, MAP_RANDOM = 1500, 2500  # map points: largest |score| + a random sample of the rest


@dataclass(frozen=True)
class RunConstants:
    """Per-run values that must not move while filtering.

    ``x_range`` / ``y_range``: map axes covering every pretraining and test point.
    ``noise_threshold``: pretraining loss at the ``1 - NOISE_TOP_FRACTION`` quantile (``None``
    without a ``pretrain_loss`` column); ``loss_range``: 1st-99th percentile, the map's colour
    range for the pretraining loss.  ``group_values``: metadata column -> its sorted distinct
    values as text (the group filter's options).
    """

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    noise_threshold: float | None
    loss_range: tuple[float, float] | None
    group_values: Mapping[str, list[str]]


@dataclass(frozen=True)
class PointData:
    """One test point's scores, read once.

    ``frame``: :func:`~dashboard.filters.score_frame` (no flags) sorted by ``total``
    descending, stable, index = ``row``.  ``score_bound``: 98th percentile of ``|total|`` (the
    map's colour range); ``cell_bound``: the same over the three score columns (table cell
    shading); ``total_max``: the largest ``|total|`` (the table bars' full length).
    ``background``: positions (in ``frame``) of the map's sample of the whole row, drawn grey
    where they do not pass the filters.
    """

    frame: pd.DataFrame
    score_bound: float
    cell_bound: float
    total_max: float
    n_helpful: int
    n_harmful: int
    total_sum: float
    background: np.ndarray


def robust_bound(values: np.ndarray, q: float = 0.98) -> float:
    """``q`` quantile of ``|values|``, else their max, else 1 (never 0: a colour range)."""
    mag = np.abs(np.asarray(values, dtype=float))
    if not len(mag):
        return 1.0
    return float(np.quantile(mag, q)) or float(mag.max()) or 1.0


def axis_range(*arrays: np.ndarray, pad: float = 0.04) -> tuple[float, float]:
    """Min / max over all ``arrays`` with ``pad`` of the span added on each side."""
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    values = values[np.isfinite(values)]
    if not len(values):
        return (-1.0, 1.0)
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo or 1.0
    return (lo - pad * span, hi + pad * span)


def noise_threshold(losses: np.ndarray, top_fraction: float = NOISE_TOP_FRACTION) -> float | None:
    """Pretraining loss at or above which an example is among the ``top_fraction`` highest."""
    values = np.asarray(losses, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    return float(np.quantile(values, 1.0 - top_fraction))


def build_run_constants(run: Run) -> RunConstants:
    """:class:`RunConstants` of ``run`` (uncached; see :func:`run_constants`)."""
    pre = np.asarray(run.pretrain_xy, dtype=float).reshape(-1, 2)
    test = np.asarray(run.test_xy, dtype=float).reshape(-1, 2)
    threshold, loss_range = None, None
    if "pretrain_loss" in run.pretrain_examples.columns:
        losses = run.pretrain_examples["pretrain_loss"].to_numpy(dtype=float)
        threshold = noise_threshold(losses)
        finite = losses[np.isfinite(losses)]
        if len(finite):
            lo, hi = (float(v) for v in np.quantile(finite, [0.01, 0.99]))
            loss_range = (lo, hi if hi > lo else lo + 1.0)
    table = run.pretrain_examples
    groups = {c: sorted(table[c].astype(str).unique()) for c in group_columns(run)
              if c != "label"}
    return RunConstants(axis_range(pre[:, 0], test[:, 0]), axis_range(pre[:, 1], test[:, 1]),
                        threshold, loss_range, groups)


def build_point_data(examples: pd.DataFrame, scores: Mapping[str, np.ndarray],
                     row: int) -> PointData:
    """:class:`PointData` of test row ``row`` (uncached; see :func:`point_data`)."""
    frame = score_frame(examples, scores, row)
    total = frame["total"].to_numpy()
    order = np.argsort(-total, kind="stable")
    frame = frame.iloc[order]
    terms = np.concatenate([total, frame["pretrained_term"].to_numpy(),
                            frame["finetuned_term"].to_numpy()])
    background = sample_positions(frame["total"].to_numpy(), MAP_TOP, MAP_RANDOM, seed=row)
    return PointData(
        frame=frame, score_bound=robust_bound(total), cell_bound=robust_bound(terms),
        total_max=float(np.abs(total).max(initial=0.0)) or 1.0,
        n_helpful=int((total > 0).sum()), n_harmful=int((total < 0).sum()),
        total_sum=float(total.sum(dtype=np.float64)), background=background)


@st.cache_resource(max_entries=8, show_spinner=False)
def _run_constants(run_id: str, _run: Run) -> RunConstants:
    return build_run_constants(_run)


def run_constants(run: Run) -> RunConstants:
    """Cached :func:`build_run_constants`, per run id."""
    return _run_constants(run.run_id, run)


@st.cache_resource(max_entries=32, show_spinner=False)
def _point_data(run_id: str, row: int, _run: Run) -> PointData:
    return build_point_data(session.examples(run_id, _run), _run.scores, row)


def point_data(run: Run, row: int) -> PointData:
    """Cached :func:`build_point_data`, per (run id, test row); do not mutate its frame."""
    return _point_data(run.run_id, int(row), run)


def flag_mask(rows: np.ndarray, flagged_ids: Collection[str], index: Mapping[str, int],
              n_rows: int) -> np.ndarray:
    """Boolean array over ``rows`` (pretraining rows): is each one flagged."""
    if not flagged_ids:
        return np.zeros(len(rows), dtype=bool)
    flagged = np.zeros(n_rows, dtype=bool)
    hits = [index[e] for e in flagged_ids if e in index]
    flagged[np.asarray(hits, dtype=np.int64)] = True
    return flagged[np.asarray(rows, dtype=np.int64)]


def with_flags(run: Run, frame: pd.DataFrame, flagged_ids: Collection[str]) -> pd.DataFrame:
    """``frame`` with its ``flagged`` column rebuilt from ``flagged_ids`` (a new frame)."""
    index = session.example_index(run.run_id, run)
    return frame.assign(flagged=flag_mask(frame["row"].to_numpy(), flagged_ids, index,
                                          run.n_pretrain))


def evidence_order(correct: bool) -> tuple[str, str]:
    """Which sign to show first: the harmful examples on a misclassified point (what made it
    wrong), the helpful ones on a correct point (what made it right)."""
    return ("helpful", "harmful") if correct else ("harmful", "helpful")


def top_rows(frame: pd.DataFrame, sign: str, k: int) -> pd.DataFrame:
    """The ``k`` most helpful (``sign="helpful"``) or most harmful rows of a frame sorted by
    total descending (as :class:`PointData` frames are), strongest first."""
    total = frame["total"].to_numpy()
    if sign == "helpful":
        return frame.iloc[:k][total[:k] > 0]
    tail = frame.iloc[::-1].iloc[:k]
    return tail[tail["total"].to_numpy() < 0]


def noise_flags(losses: np.ndarray | pd.Series, threshold: float | None) -> np.ndarray:
    """Boolean: pretraining loss at or above ``threshold`` (none without a threshold)."""
    values = np.asarray(losses, dtype=float)
    if threshold is None:
        return np.zeros(len(values), dtype=bool)
    return values >= threshold


@st.cache_resource(max_entries=8, show_spinner=False)
def _thumb_store(run_id: str, kind: str) -> dict[int, object]:
    """A per-run dict of encoded thumbnails (filled lazily; entries are immutable)."""
    return {}


def _pixels(run: Run, row: int) -> tuple[np.ndarray, tuple[int, ...]] | None:
    render = render_spec(run)
    if render.kind != "image":
        return None
    pixels = run.pretrain_examples[render.column].iloc[int(row)]
    return pixels, tuple(render.shape or infer_shape(pixels))


def strip_png(run: Run, row: int, px: int = STRIP_PX) -> bytes | None:
    """PNG bytes of pretraining row ``row`` about ``px`` pixels wide (nearest-neighbour
    upscaled, so small digits stay sharp), cached per run; ``None`` without images."""
    store = _thumb_store(run.run_id, f"strip{px}")
    if row not in store:
        found = _pixels(run, row)
        if found is None:
            return None
        pixels, shape = found
        store[row] = png_bytes(pixels_to_uint8(pixels, shape, scale=max(1, px // max(shape))))
    return store[row]  # type: ignore[return-value]


def table_thumbnails(run: Run, rows: list[int]) -> list[str] | None:
    """Data-URI thumbnails for table rows (as :func:`dashboard.example_display.thumbnails`),
    cached per run and row; ``None`` without images."""
    if render_spec(run).kind != "image":
        return None
    store = _thumb_store(run.run_id, "table")
    out = []
    for r in rows:
        r = int(r)
        if r not in store:
            pixels, shape = _pixels(run, r)  # type: ignore[misc]
            store[r] = png_data_uri(pixels, shape, scale=4)
        out.append(store[r])
    return out  # type: ignore[return-value]
