"""Filter spec, per-test-point score frames and influence aggregations (no Streamlit here).

One :class:`FilterSpec` drives the table, the charts and the exports, in the UI and the CLI.

Frames built here have one row per pretraining example: ``row`` (position in the pretraining
table = column of the score matrices), ``example_id``, ``label``, ``label_name``, the metadata
columns, ``pretrain_loss`` when present, ``text`` when the run renders text, a ``flagged``
column and, for a chosen test point, the three score columns ``total``, ``pretrained_term``,
``finetuned_term`` and ``dominant_term``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dashboard.convention import SCORE_COLUMNS
from dashboard.run_details import class_names, label_name, metadata_columns, render_spec
from engine.artifacts import Run

SIGNS = ("both", "helpful", "harmful")
DOMINANT_TERMS = ("any", "pretrained", "finetuned")
FLAG_STATUSES = ("all", "flagged", "unflagged")


@dataclass(frozen=True)
class FilterSpec:
    """What to show of the pretraining examples for one test point.

    ``sign``: "helpful" keeps total > 0, "harmful" keeps total < 0, "both" keeps every row.
    ``top_k``: keep the k most helpful and/or the k most harmful (per sign when "both");
    ``None`` keeps every row that passes the other filters.
    ``labels``: pretraining labels (ints) to keep; empty keeps all.
    ``group_column`` / ``groups``: keep rows whose metadata value (as text) is in ``groups``.
    ``score_min`` / ``score_max``: inclusive bounds on ``total``.
    ``dominant_term``: keep rows whose larger-magnitude term is "pretrained" or "finetuned".
    ``flag_status``: "flagged", "unflagged" or "all".
    ``text_query``: case-insensitive substring of the text payload (of the id without text).
    ``selected_ids``: example ids selected on the map; ``None`` means no selection.
    """

    sign: str = "both"
    top_k: int | None = 20
    labels: tuple[int, ...] = ()
    group_column: str | None = None
    groups: tuple[str, ...] = ()
    score_min: float | None = None
    score_max: float | None = None
    dominant_term: str = "any"
    flag_status: str = "all"
    text_query: str = ""
    selected_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.sign not in SIGNS:
            raise ValueError(f"sign must be one of {SIGNS}, got {self.sign!r}")
        if self.dominant_term not in DOMINANT_TERMS:
            raise ValueError(f"dominant_term must be one of {DOMINANT_TERMS}")
        if self.flag_status not in FLAG_STATUSES:
            raise ValueError(f"flag_status must be one of {FLAG_STATUSES}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be a positive integer or None")

    def replace(self, **changes: Any) -> FilterSpec:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for export manifests)."""
        out = dataclasses.asdict(self)
        out["labels"] = list(self.labels)
        out["groups"] = list(self.groups)
        if self.selected_ids is not None:
            out["selected_ids"] = list(self.selected_ids)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FilterSpec:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        for key in ("labels", "groups"):
            if key in kw:
                kw[key] = tuple(kw[key] or ())
        if kw.get("selected_ids") is not None:
            kw["selected_ids"] = tuple(kw["selected_ids"])
        return cls(**kw)

    def needs_scores(self) -> bool:
        """Whether the spec filters or ranks on scores (only meaningful for one test point)."""
        return (self.sign != "both" or self.top_k is not None or self.score_min is not None
                or self.score_max is not None or self.dominant_term != "any")


def example_table(run: Run) -> pd.DataFrame:
    """The pretraining examples without their image payload, with ``row`` and ``label_name``."""
    table = run.pretrain_examples
    names = class_names(run, "pretrain")
    labels = table["label"].to_numpy(dtype=int)
    cols: dict[str, Any] = {
        "row": np.arange(len(table)),
        "example_id": table["example_id"].astype(str).to_numpy(),
        "label": labels,
        "label_name": [label_name(names, int(v)) for v in labels],
    }
    for c in metadata_columns(run):
        cols[c] = table[c].to_numpy()
    if "pretrain_loss" in table.columns:
        cols["pretrain_loss"] = table["pretrain_loss"].to_numpy(dtype=float)
    render = render_spec(run)
    if render.kind == "text":
        cols["text"] = table[render.column].astype(str).to_numpy()
    return pd.DataFrame(cols)


def score_frame(examples: pd.DataFrame, scores: Mapping[str, np.ndarray], test_row: int,
                flagged_ids: Collection[str] = ()) -> pd.DataFrame:
    """``examples`` (from :func:`example_table`) with the scores of one test point and flags.

    Reads one row of each memory-mapped score matrix; never writes to them.
    """
    pre = np.asarray(scores["pretrained_term"][test_row])
    ft = np.asarray(scores["finetuned_term"][test_row])
    return examples.assign(
        total=np.asarray(scores["total"][test_row]),
        pretrained_term=pre,
        finetuned_term=ft,
        dominant_term=np.where(np.abs(pre) >= np.abs(ft), "pretrained", "finetuned"),
        flagged=flag_column(examples, flagged_ids),
    )


def flag_column(examples: pd.DataFrame, flagged_ids: Collection[str]) -> np.ndarray:
    """Boolean array: is each example id in ``flagged_ids``."""
    if not flagged_ids:
        return np.zeros(len(examples), dtype=bool)
    return examples["example_id"].isin(set(flagged_ids)).to_numpy()


def filter_mask(frame: pd.DataFrame, spec: FilterSpec) -> np.ndarray:
    """Boolean array over the rows of ``frame``: does each pass every part of ``spec`` except
    ``top_k`` (labels, groups, flags, text, map selection and, with score columns, sign, score
    range and dominant term)."""
    mask = np.ones(len(frame), dtype=bool)
    if spec.labels:
        mask &= np.isin(frame["label"].to_numpy(), list(spec.labels))
    if spec.group_column and spec.groups:
        if spec.group_column not in frame.columns:
            raise ValueError(f"unknown group column {spec.group_column!r}")
        mask &= frame[spec.group_column].astype(str).isin(list(spec.groups)).to_numpy()
    if spec.flag_status != "all":
        flagged = frame["flagged"].to_numpy(dtype=bool)
        mask &= flagged if spec.flag_status == "flagged" else ~flagged
    if spec.text_query:
        col = "text" if "text" in frame.columns else "example_id"
        mask &= frame[col].astype(str).str.contains(
            spec.text_query, case=False, regex=False).to_numpy(dtype=bool)
    if spec.selected_ids is not None:
        mask &= frame["example_id"].isin(set(spec.selected_ids)).to_numpy()
    if "total" not in frame.columns:
        return mask
    total = frame["total"].to_numpy()
    if spec.sign == "helpful":
        mask &= total > 0
    elif spec.sign == "harmful":
        mask &= total < 0
    if spec.score_min is not None:
        mask &= total >= spec.score_min
    if spec.score_max is not None:
        mask &= total <= spec.score_max
    if spec.dominant_term != "any":
        mask &= frame["dominant_term"].to_numpy() == spec.dominant_term
    return mask


def _ranked(positions: np.ndarray, values: np.ndarray, descending: bool) -> np.ndarray:
    """``positions`` ordered by ``values`` (stable: ties keep their order)."""
    order = np.argsort(-values if descending else values, kind="stable")
    return positions[order]


def filter_positions(frame: pd.DataFrame, spec: FilterSpec) -> np.ndarray:
    """Positions (``iloc``) of the rows of ``frame`` that pass ``spec``, in view order (see
    :func:`apply_filters`).  Works on numpy arrays only, so a 100,000-row frame is never copied
    whole."""
    idx = np.flatnonzero(filter_mask(frame, spec))
    if "total" not in frame.columns:
        return idx
    total = frame["total"].to_numpy()
    descending = spec.sign != "harmful"
    if spec.top_k is not None:
        parts = []
        if spec.sign in ("both", "helpful"):
            pos = idx[total[idx] > 0]
            parts.append(_ranked(pos, total[pos], descending=True)[:spec.top_k])
        if spec.sign in ("both", "harmful"):
            neg = idx[total[idx] < 0]
            parts.append(_ranked(neg, total[neg], descending=False)[:spec.top_k])
        idx = np.concatenate(parts) if parts else idx[:0]
    return _ranked(idx, total[idx], descending)


def apply_filters(frame: pd.DataFrame, spec: FilterSpec) -> pd.DataFrame:
    """Rows of ``frame`` that pass ``spec``, in view order.

    With score columns the view is ordered by ``total``: descending (most helpful first, most
    harmful last), ascending (most harmful first) when ``sign`` is "harmful"; ``top_k`` keeps
    the k most helpful and/or k most harmful rows (ties: the first in ``frame`` order).
    Without score columns (no test point), score-based parts of the spec are ignored and the
    pretraining-table order is kept.
    """
    return frame.iloc[filter_positions(frame, spec)]


def mean_influence(examples: pd.DataFrame, scores: Mapping[str, np.ndarray],
                       test_rows: np.ndarray, chunk: int = 64) -> pd.DataFrame:
    """Per pretraining example: mean of each score over ``test_rows`` and how many of those
    test points it helps (``n_helped``, total > 0) and harms (``n_harmed``, total < 0).

    Reads the memory-mapped matrices in row chunks, so memory stays bounded.
    """
    n_pre = len(examples)
    sums = {name: np.zeros(n_pre, dtype=np.float64) for name in SCORE_COLUMNS}
    helped = np.zeros(n_pre, dtype=np.int64)
    harmed = np.zeros(n_pre, dtype=np.int64)
    rows = np.asarray(test_rows, dtype=np.int64)
    for start in range(0, len(rows), chunk):
        idx = rows[start:start + chunk]
        for name in SCORE_COLUMNS:
            block = np.asarray(scores[name][idx])
            sums[name] += block.sum(axis=0, dtype=np.float64)
            if name == "total":
                helped += (block > 0).sum(axis=0)
                harmed += (block < 0).sum(axis=0)
    n = max(len(rows), 1)
    return examples.assign(
        **{name: sums[name] / n for name in SCORE_COLUMNS},
        n_helped=helped, n_harmed=harmed,
    )


def aggregate_by_group(influence: pd.DataFrame, column: str) -> pd.DataFrame:
    """Aggregate a per-example influence frame (one score value per example) by ``column``.

    ``total`` / ``pretrained_term`` / ``finetuned_term`` of a group are SUMS over its examples:
    for a :func:`mean_influence` frame that is the predicted change of the mean test loss if
    the whole group were removed (first order).  ``total_per_example`` is the group mean;
    ``n_helpful`` / ``n_harmful`` count examples with positive / negative total.
    """
    if column not in influence.columns:
        raise ValueError(f"unknown group column {column!r}")
    keys = influence[column] if column == "label" else influence[column].astype(str)
    grouped = influence.assign(_key=keys,
                               _helpful=influence["total"] > 0,
                               _harmful=influence["total"] < 0).groupby("_key", sort=True)
    out = pd.DataFrame({
        "n_examples": grouped.size(),
        "total": grouped["total"].sum(),
        "pretrained_term": grouped["pretrained_term"].sum(),
        "finetuned_term": grouped["finetuned_term"].sum(),
        "total_per_example": grouped["total"].mean(),
        "n_helpful": grouped["_helpful"].sum().astype(int),
        "n_harmful": grouped["_harmful"].sum().astype(int),
    })
    out.index.name = column
    out = out.reset_index()
    if column == "label" and "label_name" in influence.columns:
        names = influence.drop_duplicates("label").set_index("label")["label_name"]
        out.insert(1, "label_name", out["label"].map(names))
    return out


def most_harmful(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k rows with the most negative ``total`` (only rows with total < 0)."""
    return frame[frame["total"] < 0].nsmallest(k, "total")


def most_helpful(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k rows with the most positive ``total`` (only rows with total > 0)."""
    return frame[frame["total"] > 0].nlargest(k, "total")


def sample_positions(total: np.ndarray, n_top: int = 1500, n_random: int = 2500,
                     seed: int = 0) -> np.ndarray:
    """Sorted positions of the ``n_top`` largest ``|total|`` plus ``n_random`` others drawn at
    random (all positions when there are no more than ``n_top + n_random``).

    Deterministic for a given ``seed``, so reruns draw the same points.
    """
    n = len(total)
    if n <= n_top + n_random:
        return np.arange(n)
    mag = np.abs(np.asarray(total, dtype=float))
    top = np.argpartition(-mag, n_top - 1)[:n_top] if n_top > 0 else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(n), top, assume_unique=True)
    rng = np.random.default_rng(seed)
    sample = rng.choice(rest, size=min(n_random, len(rest)), replace=False)
    return np.sort(np.concatenate([top, sample]))


def map_sample(frame: pd.DataFrame, n_top: int = 1500, n_random: int = 2500,
               seed: int = 0) -> pd.DataFrame:
    """Downsample rows for the map: the ``n_top`` largest |total| plus a random sample of the rest.

    Deterministic for a given ``seed``, so reruns draw the same points.
    """
    if len(frame) <= n_top + n_random:
        return frame
    return frame.iloc[sample_positions(frame["total"].to_numpy(), n_top, n_random, seed)]
