"""The pretraining file's own columns for exports, so that "minus flagged" is a usable dataset.

A run stores the examples' ids, labels, metadata and a display payload, not the model's input
features.  Those live in the pretraining file the run was made from (its path is in the run's
config); the export reads them from there, after checking that the file is still the one the
run hashed (``manifest["input_hashes"]["pretrain"]``), so an export never mixes a run's scores
with another version of the data.  The exported rows then carry the feature columns, the label
value and the id under the config's own column names (the run's class index moves to
``label_index`` when the label column is called ``label``), so the file can replace the
pretraining table in the same config.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from engine.artifacts import Run, sha256_file
from engine.data import load_table

LABEL_INDEX = "label_index"


class SourceDataError(ValueError):
    """The run's pretraining file is missing, changed since the run, or unreadable."""


def _config_path(run: Run) -> Path:
    data = (run.manifest.get("config") or {}).get("data") or {}
    path = data.get("pretrain")
    if not path:
        raise SourceDataError(f"run {run.run_id} does not record its pretraining file, so the "
                              "export cannot include the feature columns")
    return Path(str(path))


def source_columns(run: Run) -> pd.DataFrame:
    """The feature columns of the run's pretraining file, its label values (under the config's
    label column name) and, when the id column is not ``example_id``, its ids; indexed by
    ``example_id`` (str).  :class:`SourceDataError` (one line, what to do) when the
    file is gone or no longer matches the hash recorded in the run."""
    path = _config_path(run)
    if not path.is_file():
        raise SourceDataError(f"the run's pretraining file {path} is gone; restore it to "
                              "export the feature columns (or export without them)")
    want = (run.manifest.get("input_hashes") or {}).get("pretrain")
    if want and sha256_file(path) != want:
        raise SourceDataError(f"{path} changed since run {run.run_id} was made (SHA-256 "
                              "differs); re-run the engine on it, or restore the file")
    data = (run.manifest.get("config") or {}).get("data") or {}
    try:
        table = load_table(path, **_table_args(data))
    except (ValueError, OSError, TypeError) as exc:
        raise SourceDataError(f"cannot read {path}: {exc}") from exc
    out = pd.DataFrame(table.X, columns=list(table.feature_columns),
                       index=pd.Index(table.ids.astype(str), name="example_id"))
    out[data.get("label_column") or "label"] = [table.classes[int(i)] for i in table.y]
    id_column = data.get("id_column") or "example_id"
    if id_column != "example_id":
        out[id_column] = out.index.to_numpy()
    return out


def _table_args(data: dict) -> dict:
    return {"id_column": data.get("id_column") or "example_id",
            "label_column": data.get("label_column") or "label",
            "feature_prefix": None if data.get("feature_columns") else data.get("feature_prefix"),
            "feature_columns": data.get("feature_columns") or None,
            "classes": data.get("pretrain_classes") or []}


def with_source_columns(frame: pd.DataFrame, run: Run) -> pd.DataFrame:
    """``frame`` (rows with ``example_id``) plus the source columns, in the same row order.
    A ``label`` column of ``frame`` (the run's class index) becomes ``label_index`` when the
    source's label column has that name; other names already in ``frame`` are kept."""
    source = source_columns(run)
    if "label" in source.columns and "label" in frame.columns:
        frame = frame.rename(columns={"label": LABEL_INDEX})
    extra = source[[c for c in source.columns if c not in frame.columns]]
    return frame.join(extra, on="example_id")
