"""Read the optional, engine-specific parts of a loaded run defensively (no Streamlit here).

``engine.artifacts`` guarantees only a handful of columns and manifest keys; everything else
(class names, render payload, metadata columns, convergence, validation) may be absent, or of
another type, in a run written by another engine version or edited by hand, so every accessor
here has a sensible fallback (:func:`manifest_mapping` for the nested sections).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.artifacts import Run

#: Columns of ``pretrain_examples.parquet`` that are never offered as metadata / groups.
NON_METADATA_COLUMNS = {"example_id", "label", "pretrain_loss", "pixels", "text"}


@dataclass(frozen=True)
class RenderSpec:
    """How to show an example: an image payload of ``shape``, a text payload, or nothing."""

    kind: str  # "image" | "text" | "none"
    column: str | None = None
    shape: tuple[int, ...] | None = None


def manifest_mapping(run: Run, key: str) -> Mapping[str, Any]:
    """``run.manifest[key]`` when it is a mapping, else an empty one (absent or malformed)."""
    value = run.manifest.get(key) if isinstance(run.manifest, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _image_shape(raw: Any) -> tuple[int, ...] | None:
    """A positive integer shape from the manifest, or ``None`` (inferred from the pixels)."""
    if not isinstance(raw, (list, tuple)):
        return None
    try:
        shape = tuple(int(s) for s in raw)
    except (TypeError, ValueError):
        return None
    return shape if shape and all(s > 0 for s in shape) else None


def render_spec(run: Run) -> RenderSpec:
    """The render payload of a run, from the manifest or guessed from the table columns."""
    spec = manifest_mapping(run, "render")
    kind = spec.get("kind")
    cols = set(run.pretrain_examples.columns)
    column = spec.get("column")
    if not isinstance(column, str):
        column = "pixels" if kind == "image" else "text"
    if kind == "image" and column in cols:
        return RenderSpec("image", column, _image_shape(spec.get("shape")))
    if kind == "text" and column in cols:
        return RenderSpec("text", column)
    if kind is None:
        if "pixels" in cols:
            return RenderSpec("image", "pixels", None)
        if "text" in cols:
            return RenderSpec("text", "text")
    return RenderSpec("none")


def class_names(run: Run, stage: str) -> list[str]:
    """Class names of ``stage`` ("pretrain" or "finetune"); label ints index into them."""
    names = manifest_mapping(run, "classes").get(stage)
    if isinstance(names, (list, tuple)) and names:
        return [str(n) for n in names]
    table = run.pretrain_examples if stage == "pretrain" else run.test_points
    cols = ["label"] + (["pred"] if stage == "finetune" else [])
    top = int(max(int(table[c].max()) for c in cols)) if len(table) else 0
    return [str(i) for i in range(top + 1)]


def label_name(names: list[str], label: int) -> str:
    """Display name of a label int (the int itself when out of range)."""
    return names[label] if 0 <= label < len(names) else str(label)


def metadata_columns(run: Run) -> list[str]:
    """Extra columns of the pretraining table that can serve as metadata or groups."""
    render = render_spec(run).column
    return [c for c in run.pretrain_examples.columns
            if c not in NON_METADATA_COLUMNS and c != render]


def group_columns(run: Run) -> list[str]:
    """Columns the pretraining data can be aggregated by: label first, then low-cardinality
    metadata columns (at most 200 distinct values)."""
    table = run.pretrain_examples
    cols = ["label"]
    for c in metadata_columns(run):
        try:
            if table[c].nunique(dropna=False) <= 200:
                cols.append(c)
        except TypeError:  # unhashable values (lists): not a grouping column
            continue
    return cols


def probability_columns(run: Run) -> list[str]:
    """``prob_0..prob_{C-1}`` columns of the test table, in class order."""
    cols = [c for c in run.test_points.columns if c.startswith("prob_") and c[5:].isdigit()]
    return sorted(cols, key=lambda c: int(c[5:]))


def misclassified_rows(run: Run) -> np.ndarray:
    """Row positions (into the score matrices) of the misclassified test points."""
    return np.flatnonzero(~run.test_points["correct"].to_numpy(dtype=bool))


def confusion_matrix(run: Run) -> pd.DataFrame:
    """Counts of (true label, predicted label) over the test points, class names as axes."""
    names = class_names(run, "finetune")
    n = len(names)
    counts = np.zeros((n, n), dtype=int)
    labels = run.test_points["label"].to_numpy(dtype=int)
    preds = run.test_points["pred"].to_numpy(dtype=int)
    ok = (labels >= 0) & (labels < n) & (preds >= 0) & (preds < n)
    np.add.at(counts, (labels[ok], preds[ok]), 1)
    return pd.DataFrame(counts, index=pd.Index(names, name="true"),
                        columns=pd.Index(names, name="predicted"))


def stage_rows(run: Run) -> pd.DataFrame:
    """One row per stage with solver, damping, convergence and the solver's numbers."""
    stages = manifest_mapping(run, "stages")
    rows = []
    for name in ("pretrain", "finetune"):
        info = stages.get(name)
        if not isinstance(info, Mapping):
            continue
        row: dict[str, Any] = {"stage": name}
        for key in ("solver", "damping", "converged", "status", "final_grad_norm", "tolerance",
                    "min_eigenvalue", "curvature_check", "iterations", "weight_decay"):
            row[key] = info.get(key)
        row.update({k: v for k, v in info.items()
                    if k not in row and isinstance(v, (int, float, str, bool))})
        rows.append(row)
    return pd.DataFrame(rows)


def unconverged_stages(run: Run) -> list[str]:
    """Stages whose solver did not report convergence (``converged`` false or missing)."""
    stages = manifest_mapping(run, "stages")
    return [str(name) for name, info in stages.items()
            if not (isinstance(info, Mapping) and info.get("converged", False) is True)]


def task_description(run: Run) -> str:
    """One line naming the task: dataset name from the config and the finetuning classes."""
    config = manifest_mapping(run, "config")
    data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
    config_path = run.manifest.get("config_path")
    from_path = Path(config_path).parent.name if isinstance(config_path, str) else ""
    name = data.get("name") or data.get("dataset") or from_path or run.path.name
    ft = class_names(run, "finetune")
    pre = class_names(run, "pretrain")
    return f"{name}: pretraining on {len(pre)} classes, finetuning on {' / '.join(ft)}"
