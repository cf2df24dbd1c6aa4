"""The end-to-end run: data -> both training stages -> evaluation -> scores -> map -> run dir.

``python -m engine run CONFIG --out RUN_DIR`` calls :func:`run`; validation reloads the same
task and trained parameters from a finished run with :func:`task_from_run`.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from engine import artifacts
from engine.config import RunConfig, StageConfig, load_config
from engine.curvature import (
    Solver,
    check_curvature_batch,
    check_stage_solver,
    finetune_joint_hessian,
    make_solver,
    pretrain_hessian,
)
from engine.data import Table, load_run_data
from engine.maps import map_coordinates
from engine.models import build_model
from engine.pause_points import pause_point
from engine.progress import Progress, TrainingProgress
from engine.scores import InfluenceArguments, compute_scores
from engine.task import TwoStageTask
from engine.training import MinibatchSettings, NotConvergedWarning, TwoStageFit, fit_two_stage

log = logging.getLogger(__name__)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class RunInputError(ValueError):
    """The run command's inputs are inconsistent (unknown ids, empty selections)."""


@dataclass
class PreparedData:
    """The three tables of a config, with pretraining rows restricted to the kept examples."""

    cfg: RunConfig
    pretrain: Table
    finetune_train: Table
    finetune_test: Table
    keep: np.ndarray            # boolean mask over the pretraining FILE's rows
    excluded_ids: list[str]
    shift: np.ndarray | None = None   # [data] standardize: inputs = (X - shift) / scale
    scale: np.ndarray | None = None

    def inputs(self, table: Table) -> np.ndarray:
        """The model inputs of a table's rows (standardized when the config says so)."""
        if self.shift is None or self.scale is None:
            return table.X
        return (table.X - self.shift) / self.scale


# Features beyond this magnitude make full-batch training slow or overflow; say so up front.
FEATURE_SCALE_LIMIT = 1e4


def prepare_data(cfg: RunConfig, exclude_ids: Sequence[str] = ()) -> PreparedData:
    """Load and validate the data; drop excluded pretraining examples (unknown ids: error)."""
    pretrain, ft_train, ft_test = load_run_data(cfg)
    known = set(pretrain.ids.tolist())
    unknown = [i for i in exclude_ids if i not in known]
    if unknown:
        raise RunInputError(
            f"{len(unknown)} excluded id(s) are not pretraining example ids of "
            f"{pretrain.path.name}: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}. "
            "Use the `example_id` values of the run's pretraining table.")
    keep = ~np.isin(pretrain.ids, list(exclude_ids))
    if not keep.any():
        raise RunInputError("every pretraining example is excluded; nothing is left to train on")
    shift = scale = None
    if cfg.data.standardize:
        # Statistics of the whole pretraining file, so that --exclude retrains see the same
        # inputs as the run they are compared with.
        shift = pretrain.X.mean(axis=0)
        scale = pretrain.X.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        if not (np.isfinite(shift).all() and np.isfinite(scale).all()):
            raise RunInputError(f"{pretrain.path.name}: features are too large to standardize "
                                "in float64 (their mean or spread overflows); rescale them")
    else:
        for table in (pretrain, ft_train, ft_test):
            big = np.abs(table.X).max(initial=0.0)
            if big > FEATURE_SCALE_LIMIT:
                col = int(np.abs(table.X).max(axis=0).argmax())
                raise RunInputError(
                    f"{table.path.name}: feature column #{col} reaches |x| = {big:.3g}; features "
                    f"beyond {FEATURE_SCALE_LIMIT:g} make training slow or overflow. Standardize "
                    "them, or set `standardize = true` in the config's [data] section")
    if cfg.model.architecture == "cnn":
        size, n_features = math.prod(cfg.data.image_shape), pretrain.X.shape[1]
        if size != n_features:
            raise RunInputError(
                f"{pretrain.path.name}: [model] architecture = 'cnn' reshapes the features to "
                f"[data] image_shape = {list(cfg.data.image_shape)} ({size} values), but the "
                f"files have {n_features} feature columns; fix image_shape (or the features)")
    return PreparedData(cfg, pretrain, ft_train, ft_test, keep,
                        list(dict.fromkeys(exclude_ids)), shift, scale)


def build_task(data: PreparedData) -> TwoStageTask:
    """The built-in MLP or CNN two-stage task of a config (modules initialized from the seed)."""
    cfg = data.cfg
    dtype = DTYPES[cfg.dtype]
    torch.manual_seed(cfg.seed)
    m = cfg.model
    backbone, pre_head, ft_head = build_model(
        data.pretrain.X.shape[1], m.hidden, m.activation,
        len(data.pretrain.classes), len(data.finetune_train.classes),
        architecture=m.architecture, image_shape=cfg.data.image_shape, channels=m.channels,
        kernel_size=m.kernel_size, pool=m.pool)
    for m in (backbone, pre_head, ft_head):
        m.to(dtype)
    keep = data.keep

    def tensors(table: Table, mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data.inputs(table), table.y
        if mask is not None:
            x, y = x[mask], y[mask]
        return torch.as_tensor(x, dtype=dtype), torch.as_tensor(y, dtype=torch.long)

    tracked = cfg.influence.tracked_backbone
    return TwoStageTask(
        backbone, pre_head, ft_head, tensors(data.pretrain, keep), tensors(data.finetune_train),
        pretrain_weight_decay=cfg.pretrain.weight_decay,
        finetune_weight_decay=cfg.finetune.weight_decay,
        scenario=cfg.finetune.scenario, alpha=cfg.finetune.alpha,
        measurement=cfg.influence.measurement,
        tracked_backbone=None if tracked == "all" else list(tracked))


def minibatch_settings(stage: StageConfig, seed: int) -> MinibatchSettings | None:
    """A stage's adam / sgd settings, or ``None`` for the certified (newton) trainer."""
    if stage.optimizer == "newton":
        return None
    return MinibatchSettings(stage.optimizer, stage.epochs, stage.batch_size,
                             stage.learning_rate, stage.momentum, seed)


def train(task: TwoStageTask, cfg: RunConfig, **kwargs: Any) -> TwoStageFit:
    """Both stages with the config's trainers, tolerances and iteration limits."""
    kwargs.setdefault("optimizer", (minibatch_settings(cfg.pretrain, cfg.seed),
                                    minibatch_settings(cfg.finetune, cfg.seed + 1)))
    return fit_two_stage(task, tolerance=(cfg.pretrain.tolerance, cfg.finetune.tolerance),
                         max_iter=(cfg.pretrain.max_iter, cfg.finetune.max_iter), **kwargs)


# Tables larger than this are evaluated in chunks of this many rows (bounded memory, e.g. a CNN
# on 60,000 images); smaller ones in one pass, as before.
EVAL_CHUNK = 4096


def _by_rows(fn: Callable[[slice], torch.Tensor], n: int) -> torch.Tensor:
    """``fn(rows)`` for all ``n`` rows: one call, or concatenated chunks of ``EVAL_CHUNK``."""
    if n <= EVAL_CHUNK:
        return fn(slice(None))
    return torch.cat([fn(slice(s, s + EVAL_CHUNK)) for s in range(0, n, EVAL_CHUNK)])


def predict(task: TwoStageTask, fit: TwoStageFit, x: torch.Tensor, y: torch.Tensor
            ) -> dict[str, np.ndarray]:
    """Finetuned-model predictions: probabilities, predicted class, loss and measurement."""
    with torch.no_grad():
        out = _by_rows(lambda r: task.finetune_outputs(fit.t, fit.backbone_ft, x[r]), len(x))
        probs = torch.softmax(out, dim=1)
        return {"probs": probs.numpy(), "pred": probs.argmax(1).numpy(),
                "loss": task.finetune_loss(out, y).numpy(),
                "measure": _by_rows(lambda r: task.measure(fit.t, fit.backbone_ft, x[r], y[r]),
                                    len(x)).numpy()}


def select_test_points(cfg: RunConfig, test: Table, correct: np.ndarray) -> np.ndarray:
    """Row indices of the test points to score, in test-table order."""
    sel = cfg.influence.test_points
    if sel == "all":
        return np.arange(len(test))
    if sel == "misclassified":
        idx = np.flatnonzero(~correct)
        if len(idx) == 0:
            raise RunInputError("test_points = 'misclassified' but no test point is misclassified")
        return idx
    pos = {tid: i for i, tid in enumerate(test.ids.tolist())}
    unknown = [t for t in sel if t not in pos]
    if unknown:
        raise RunInputError(f"[influence] test_points names unknown test ids {unknown[:5]}")
    return np.array(sorted(pos[t] for t in sel))


def stage_solver(stage: StageConfig, seed: int = 0) -> Solver:
    """The curvature solver a stage's config names, with its options."""
    ekfac = {"fisher": stage.fisher, "relative_damping": stage.relative_damping, "seed": seed}
    if stage.solver == "ekfac":
        return make_solver("ekfac", **ekfac)
    if stage.solver == "ekfac+cg":
        return make_solver("ekfac+cg", iterations=stage.cg_iterations, **ekfac)
    return make_solver(stage.solver)


def memory_budget(cfg: RunConfig) -> int:
    """``[influence] memory_budget_gb`` in bytes."""
    return int(cfg.influence.memory_budget_gb * 2**30)


def check_curvature_settings(cfg: RunConfig, task: TwoStageTask) -> None:
    """Before training: each stage's solver against the size of its curvature (H: n_u + n_w
    variables; A_TT: n_t (fixed) or B: n_t + n_u (updated)), and one curvature batch against
    the memory budget.  Raises a one-line error naming the setting to change."""
    budget = memory_budget(cfg)
    dtype = DTYPES[cfg.dtype]
    nu, nw, nt = task.u_layout.numel, task.w_layout.numel, task.t_layout.numel
    fixed = task.scenario == "fixed"
    check_stage_solver("pretrain", cfg.pretrain.solver, nu + nw, dtype, budget,
                       matrix="Hessian H")
    check_stage_solver("finetune", cfg.finetune.solver, nt if fixed else nt + nu, dtype, budget,
                       matrix="head Hessian A_TT" if fixed else "joint Hessian B")
    # Activations do not depend on the parameter values: the initial ones will do.
    ub, w, t = task.initial_state()
    start = TwoStageFit(ub, w, ub, t)
    batch = cfg.influence.curvature_batch_size
    check_curvature_batch("pretrain", pretrain_hessian(task, start, batch, memory_budget=budget))
    # B's products have the variables of the fixed scenario's cross term A_UT ([t; u]) too.
    check_curvature_batch("finetune", finetune_joint_hessian(task, start, batch,
                                                             memory_budget=budget))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "pandas", "pyarrow", "scikit-learn", "umap-learn"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _render_column(cfg: RunConfig, table: Table, rows: np.ndarray) -> dict[str, Any]:
    if cfg.data.render == "image":
        return {"pixels": [r.astype(np.float32) for r in table.X[rows]]}
    if cfg.data.render == "text" and cfg.data.text_column:
        return {"text": table.frame[cfg.data.text_column].to_numpy()[rows]}
    return {}


def _render_spec(cfg: RunConfig) -> dict[str, Any]:
    if cfg.data.render == "image":
        return {"kind": "image", "column": "pixels", "shape": list(cfg.data.image_shape)}
    if cfg.data.render == "text":
        return {"kind": "text", "column": "text"}
    return {"kind": "none"}


def run(config_path: str | Path, out_dir: str | Path, *, scenario: str | None = None,
        alpha: float | None = None, exclude_ids: Sequence[str] = (), overwrite: bool = False,
        echo: Callable[[str], None] = print) -> Path:
    """Train, evaluate, score and map; write the run atomically to ``out_dir``."""
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    def phase(name: str, start: float) -> None:
        timings[name] = round(time.perf_counter() - start, 3)

    t0 = time.perf_counter()
    cfg = load_config(config_path).with_overrides(scenario=scenario, alpha=alpha)
    data = prepare_data(cfg, exclude_ids)
    task = build_task(data)
    # Everything that can be checked is checked before training: each stage's solver against
    # its curvature's size and the memory budget, the test-point selection and the destination
    # (which is staged now, so an unwritable --out fails at once).
    check_curvature_settings(cfg, task)
    if not isinstance(cfg.influence.test_points, str):
        select_test_points(cfg, data.finetune_test, np.ones(len(data.finetune_test), bool))
    staging = artifacts.open_destination(out_dir, overwrite, echo)
    with staging:
        try:
            return _run(cfg, config_path, data, task, staging, overwrite, echo, timings, t0,
                        t_all, phase)
        except KeyboardInterrupt:
            if staging.path == staging.dest:      # the signal arrived right after the swap
                raise KeyboardInterrupt(f"the run was written completely to {staging.dest}"
                                        ) from None
            raise KeyboardInterrupt(f"nothing was written ({staging.dest} is unchanged)"
                                    ) from None


def _run(cfg: RunConfig, config_path: str | Path, data: PreparedData, task: TwoStageTask,
         staging: artifacts.Staging, overwrite: bool, echo: Callable[[str], None],
         timings: dict[str, float], t0: float, t_all: float,
         phase: Callable[[str, float], None]) -> Path:
    phase("load", t0)
    echo(f"data: {int(data.keep.sum())} pretraining examples "
         f"({len(data.excluded_ids)} excluded), {len(data.finetune_train)} finetuning, "
         f"{len(data.finetune_test)} test; {task.u_layout.numel + task.w_layout.numel} "
         f"pretraining parameters, scenario {task.scenario}")

    t0 = time.perf_counter()
    pause_point("training")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NotConvergedWarning)
        fit = train(task, cfg, monitor=TrainingProgress())
    for w in caught:
        echo(f"WARNING: {w.message}")
    timings["pretrain"] = round(fit.pretrain.seconds, 3)
    timings["finetune"] = round(fit.finetune.seconds, 3)
    echo(f"trained: pretraining gradient norm {fit.pretrain.final_grad_norm:.2e}, "
         f"finetuning {fit.finetune.final_grad_norm:.2e} ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    dtype = DTYPES[cfg.dtype]
    x_test = torch.as_tensor(data.inputs(data.finetune_test), dtype=dtype)
    y_test = torch.as_tensor(data.finetune_test.y, dtype=torch.long)
    pred = predict(task, fit, x_test, y_test)
    correct = pred["pred"] == data.finetune_test.y
    pre_x, pre_y = task.pretrain_data
    with torch.no_grad():
        pre_out = _by_rows(lambda r: task.pretrain_outputs(fit.backbone_pre, fit.w, pre_x[r]),
                           len(pre_x))
        pre_losses = task.pretrain_loss(pre_out, pre_y).numpy()
        pre_acc = float((pre_out.argmax(1) == pre_y).double().mean())
        ft_x, ft_y = task.finetune_data
        ft_acc = float((task.finetune_outputs(fit.t, fit.backbone_ft, ft_x).argmax(1) == ft_y)
                       .double().mean())
    rows = select_test_points(cfg, data.finetune_test, correct)
    phase("evaluate", t0)

    t0 = time.perf_counter()
    inf = cfg.influence
    args = InfluenceArguments(
        pretrain_damping=cfg.pretrain.damping, finetune_damping=cfg.finetune.damping,
        pretrain_solver=stage_solver(cfg.pretrain, cfg.seed),
        finetune_solver=stage_solver(cfg.finetune, cfg.seed),
        batch_size=inf.batch_size, scoring_method=inf.scoring_method,
        direction_rank=inf.direction_rank, reuse_training_curvature=True,
        pretrain_curvature=cfg.pretrain.curvature, finetune_curvature=cfg.finetune.curvature,
        curvature_batch_size=inf.curvature_batch_size, memory_budget=memory_budget(cfg))
    rank = f", directions of rank {inf.direction_rank}" if inf.direction_rank else ""
    solvers = (cfg.pretrain.solver if cfg.pretrain.solver == cfg.finetune.solver
               else f"{cfg.pretrain.solver} / {cfg.finetune.solver}")
    echo(f"scoring {len(rows)} test points x {len(pre_x)} pretraining examples "
         f"(solver {solvers}{rank})")
    pause_point("scoring")
    scores = compute_scores(task, fit, x_test[rows], y_test[rows], args,
                            progress=Progress("per-example gradients"))
    timings.update({k: round(v, 3) for k, v in scores.timings.items()})
    if scores.settings["approximation"]:
        echo(f"NOTE: {scores.settings['approximation']}")
    phase("influence", t0)

    t0 = time.perf_counter()
    with torch.no_grad():
        f_pre = _by_rows(lambda r: task.features(fit.backbone_pre, pre_x[r]), len(pre_x)).numpy()
        x_rows = x_test[rows]
        f_test = _by_rows(lambda r: task.features(fit.backbone_pre, x_rows[r]),
                          len(x_rows)).numpy()
    echo(f"map: {cfg.map.method} of backbone features")
    pre_xy, test_xy = map_coordinates(f_pre, f_test, method=cfg.map.method,
                                      n_neighbors=cfg.map.n_neighbors,
                                      min_dist=cfg.map.min_dist, seed=cfg.seed)
    phase("map", t0)

    t0 = time.perf_counter()
    test = data.finetune_test
    probs = pred["probs"][rows]
    test_df = pd.DataFrame({
        "test_id": test.ids[rows], "label": test.y[rows], "pred": pred["pred"][rows],
        "loss": pred["loss"][rows], "measurement": pred["measure"][rows],
        "correct": correct[rows], "confidence": probs.max(1),
        **{f"prob_{c}": probs[:, c] for c in range(probs.shape[1])},
        **_render_column(cfg, test, rows)})
    keep_rows = np.flatnonzero(data.keep)
    pre_frame = data.pretrain.frame.iloc[keep_rows].reset_index(drop=True)
    meta = {c: pre_frame[c].to_numpy() for c in cfg.data.metadata_columns}
    pre_df = pd.DataFrame({
        "example_id": data.pretrain.ids[keep_rows], "label": data.pretrain.y[keep_rows],
        **meta, "pretrain_loss": pre_losses, **_render_column(cfg, data.pretrain, keep_rows)})
    n_mis = int((~correct).sum())
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
            "n_misclassified": n_mis, "n_scored": int(len(rows)),
            "pretrain_train_accuracy": pre_acc, "finetune_train_accuracy": ft_acc,
        },
        "classes": {"pretrain": [str(c) for c in data.pretrain.classes],
                    "finetune": [str(c) for c in data.finetune_train.classes]},
        "render": _render_spec(cfg),
        "excluded_ids": data.excluded_ids,
        "input_hashes": {k: artifacts.sha256_file(Path(getattr(cfg.data, k)))
                         for k in ("pretrain", "finetune_train", "finetune_test")},
        "versions": _versions(),
        "timings": timings,
    }
    model_arrays = {"backbone_pre": fit.backbone_pre.numpy(), "w": fit.w.numpy(),
                    "backbone_ft": fit.backbone_ft.numpy(), "t": fit.t.numpy()}
    timings["total"] = round(time.perf_counter() - t_all, 3)
    path = artifacts.write_run(
        staging.dest, manifest, test_df, pre_df,
        {"total": scores.total.numpy(), "pretrained_term": scores.pretrained_term.numpy(),
         "finetuned_term": scores.finetuned_term.numpy()},
        pre_xy, test_xy, overwrite=overwrite, model_arrays=model_arrays, staging=staging)
    echo(f"wrote {path} in {time.perf_counter() - t_all:.1f}s: test accuracy "
         f"{correct.mean():.3f}, {n_mis} of {len(correct)} test points misclassified; "
         "time per phase: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()
                                        if k != "total"))
    return path


def task_from_run(run: artifacts.Run) -> tuple[PreparedData, TwoStageTask, TwoStageFit]:
    """Rebuild a finished run's task and trained parameters (for validation retraining).

    Refuses when the input files changed since the run was made.
    """
    cfg = load_config(run.manifest["config_path"]).with_overrides(
        scenario=run.manifest["scenario"], alpha=run.manifest["config"]["finetune"]["alpha"])
    for key, digest in run.manifest["input_hashes"].items():
        if artifacts.sha256_file(Path(getattr(cfg.data, key))) != digest:
            raise artifacts.RunError(
                f"input file {getattr(cfg.data, key)} changed since run {run.path} was made; "
                "re-run `python -m engine run` first")
    data = prepare_data(cfg, run.manifest.get("excluded_ids", []))
    task = build_task(data)
    arrays = artifacts.load_model_arrays(run)
    dtype = DTYPES[cfg.dtype]
    fit = TwoStageFit(*(torch.as_tensor(arrays[k], dtype=dtype)
                        for k in ("backbone_pre", "w", "backbone_ft", "t")))
    return data, task, fit

