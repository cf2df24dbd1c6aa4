"""What a finished run records: its tables, manifest and model arrays (rank 0 of a run).

:func:`write_outputs` turns the results of :func:`engine.pipeline.run`'s phases
(:class:`RunOutputs`) into the run directory's tables and manifest and hands them to
:func:`engine.artifacts.write_run`, which hashes every file and swaps the run into place.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from engine import artifacts
from engine.atomic_dir import Staging
from engine.config import RunConfig
from engine.data import Table
from engine.devices import numerics, to_host
from engine.distributed import DistContext
from engine.scores import InfluenceScores
from engine.task import TwoStageTask
from engine.training import TwoStageFit

if TYPE_CHECKING:   # engine.pipeline imports this module
    from engine.distributed.writing import RankStaging
    from engine.pipeline import PreparedData


@dataclass
class RunOutputs:
    """The results of a run's phases that its files record (``pre_losses``: every
    pretraining example's, gathered on rank 0; ``finetune``: the ``finetune_influence``
    manifest section when the finetuning examples were scored into the staging directory)."""

    fit: TwoStageFit
    scores: InfluenceScores
    rows: np.ndarray               # scored test points (rows of the test table)
    pred: dict[str, np.ndarray]    # engine.pipeline.predict on the whole test table
    correct: np.ndarray
    pre_losses: torch.Tensor
    pre_acc: float
    ft_acc: float
    pre_xy: np.ndarray
    test_xy: np.ndarray
    finetune: dict[str, Any] | None = None   # engine.finetune_influence's manifest section


def versions() -> dict[str, str]:
    """Versions of Python and the packages that shape the results."""
    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "pandas", "pyarrow", "scikit-learn", "umap-learn"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def render_column(cfg: RunConfig, table: Table, rows: np.ndarray) -> dict[str, Any]:
    """The column(s) the dashboard shows an example with (pixels or text), for ``rows``."""
    if cfg.data.render == "image":
        return {"pixels": [r.astype(np.float32) for r in table.X[rows]]}
    if cfg.data.render == "text" and cfg.data.text_column:
        return {"text": table.frame[cfg.data.text_column].to_numpy()[rows]}
    return {}


def render_spec(cfg: RunConfig) -> dict[str, Any]:
    """How the dashboard renders examples (the manifest's ``render``)."""
    if cfg.data.render == "image":
        return {"kind": "image", "column": "pixels", "shape": list(cfg.data.image_shape)}
    if cfg.data.render == "text":
        return {"kind": "text", "column": "text"}
    return {"kind": "none"}


def write_outputs(cfg: RunConfig, config_path: str | Path, data: PreparedData,
                  task: TwoStageTask, out: RunOutputs,
                  score_arrays: dict[str, np.ndarray] | None,
                  staging: Staging | RankStaging, overwrite: bool, timings: dict[str, float],
                  world: DistContext, parent: dict[str, str] | None = None) -> Path:
    """Build the tables, manifest and model arrays and write the run (rank 0 only).

    ``score_arrays=None``: the score files are already in ``staging`` (written by the ranks).
    ``parent``: the run this one retrains (``run --parent``), recorded as ``parent``.
    """
    fit, scores, rows, pred, correct = out.fit, out.scores, out.rows, out.pred, out.correct
    test = data.finetune_test
    probs = pred["probs"][rows]
    test_df = pd.DataFrame({
        "test_id": test.ids[rows], "label": test.y[rows], "pred": pred["pred"][rows],
        "loss": pred["loss"][rows], "measurement": pred["measure"][rows],
        "correct": correct[rows], "confidence": probs.max(1),
        **{f"prob_{c}": probs[:, c] for c in range(probs.shape[1])},
        **render_column(cfg, test, rows)})
    keep_rows = np.flatnonzero(data.keep)
    pre_frame = data.pretrain.frame.iloc[keep_rows].reset_index(drop=True)
    meta = {c: pre_frame[c].to_numpy() for c in cfg.data.metadata_columns}
    pre_df = pd.DataFrame({
        "example_id": data.pretrain.ids[keep_rows], "label": data.pretrain.y[keep_rows],
        **meta, "pretrain_loss": to_host(out.pre_losses),
        **render_column(cfg, data.pretrain, keep_rows)})
    manifest = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "config_path": str(Path(config_path).resolve()),
        "scenario": task.scenario,
        "alpha": task.alpha if task.scenario == "updated" else None,
        "measurement": scores.settings["measurement"],
        "tracked_backbone": scores.settings["tracked_backbone"],
        "approximation": scores.settings["approximation"],
        "scoring": scores.settings["scoring"],
        "stages": {
            "pretrain": {**scores.settings["pretrain"], **fit.pretrain.summary()},
            "finetune": {**scores.settings["finetune"], **fit.finetune.summary()},
        },
        "metrics": {
            "test_accuracy": float(correct.mean()), "n_test": int(len(correct)),
            "n_misclassified": int((~correct).sum()), "n_scored": int(len(rows)),
            "pretrain_train_accuracy": out.pre_acc, "finetune_train_accuracy": out.ft_acc,
        },
        "classes": {"pretrain": [str(c) for c in data.pretrain.classes],
                    "finetune": [str(c) for c in data.finetune_train.classes]},
        "render": render_spec(cfg),
        "excluded_ids": data.excluded_ids,
        "excluded_finetune_ids": data.excluded_finetune_ids,
        "input_hashes": {k: artifacts.sha256_file(Path(getattr(cfg.data, k)))
                         for k in ("pretrain", "finetune_train", "finetune_test")},
        "versions": versions(),
        "timings": timings,
        # Who computed it: the process group and each rank's pretraining examples [lo, hi).
        "distributed": {**world.describe(),
                        "shards": [[s.lo, s.hi] for s in world.shards(len(pre_df))]},
        # Where it was computed and what decided float32 arithmetic there (rank 0's device;
        # under torchrun every rank uses cuda:LOCAL_RANK or the CPU).
        "device": {"requested": cfg.device, **numerics(task.device)},
    }
    if parent is not None:   # {"run_id", "name"} of the run this one retrains
        manifest["parent"] = dict(parent)
    if out.finetune is not None:   # finetune_scores.npy / finetune_examples.parquet are staged
        manifest["finetune_influence"] = out.finetune
    model_arrays = {name: to_host(getattr(fit, name))
                    for name in ("backbone_pre", "w", "backbone_ft", "t")}
    return artifacts.write_run(staging.dest, manifest, test_df, pre_df, score_arrays,
                               out.pre_xy, out.test_xy, overwrite=overwrite,
                               model_arrays=model_arrays, staging=staging)
